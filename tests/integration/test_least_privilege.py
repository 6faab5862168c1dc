"""The relay, the writer, the operator commands and an inbox consumer work with exactly the
GRANTs that `outbox grants` prints (docs/security.md), and nothing more."""

import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg import sql

import outbox
from tests.relay_process import RelayProcess, all_confirmed, wait_for
from tests.verify import verify

PASSWORD = "lp-" + uuid.uuid4().hex[:12]


@pytest.fixture
def role(admin_dsn, dsn):
    """Make a login role with no privileges at all; its DSN to the test database."""
    made = []

    def make(kind: str, retention: bool = False) -> str:
        name = f"lp_{kind}_{uuid.uuid4().hex[:8]}"
        made.append(name)
        with psycopg.connect(admin_dsn, autocommit=True) as c:
            c.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(PASSWORD)
                )
            )
        args = [sys.executable, "-m", "relay", "grants", "--role", name, "--for", kind]
        grants = subprocess.run(
            args + (["--retention"] if retention else []),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        with psycopg.connect(dsn, autocommit=True) as c:  # the owner grants
            c.execute(grants)
        return psycopg.conninfo.make_conninfo(dsn, user=name, password=PASSWORD)

    yield make
    with psycopg.connect(dsn, autocommit=True) as c:  # the owner takes its grants back
        for name in made:
            ident = sql.Identifier(name)
            c.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(ident))
            c.execute(sql.SQL("REVOKE ALL ON SCHEMA public FROM {}").format(ident))
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        for name in made:
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_writer_and_relay_work_with_their_grants_only(role, bootstrap, topic, tmp_path, dsn):
    writer_dsn, relay_dsn = role("writer"), role("relay")
    with psycopg.connect(writer_dsn) as conn:
        with conn.transaction():
            outbox.publish_many(
                conn,
                [dict(topic=topic, key=f"k{i % 5}", payload={"i": i}) for i in range(200)],
                lock_key=True,
            )
            first = outbox.publish(conn, topic=topic, payload={}, dedup_key="d-1")
            again = outbox.publish(conn, topic=topic, payload={}, dedup_key="d-1")
            # Scheduled: written SCHEDULED by the writer, promoted by the relay's promoter.
            outbox.publish(conn, topic=topic, key="k0", payload={}, delay=1)
        assert (again.id, again.created) == (first.id, False)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE local_message SET status = 'CONFIRMED'")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT payload FROM local_message")
    relay = RelayProcess("lp", relay_dsn, bootstrap, tmp_path)
    try:
        wait_for(lambda: all_confirmed(dsn, 202), 60, "delivery by the least-privileged relay")
        assert relay.stop() == 0
    finally:
        if relay.alive():
            relay.kill()
    assert "permission denied" not in relay.log()
    verify(dsn, bootstrap, topic).assert_clean()
    with psycopg.connect(relay_dsn) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO local_message (topic, payload) VALUES ('t', 'x')")


def test_operator_commands_work_with_operator_grants(role, dsn):
    with psycopg.connect(dsn) as conn, conn.transaction():
        ids = [p.id for p in outbox.publish_many(conn, [dict(topic="t", key="k", payload={})] * 3)]
    with psycopg.connect(dsn) as c:
        c.execute(
            "UPDATE local_message SET status = 'FAILED', created_at = now() - "
            "interval '9 days' WHERE id = %s",
            (ids[0],),
        )
        c.execute(
            "UPDATE local_message SET status = 'CONFIRMED', created_at = now() - "
            "interval '9 days' WHERE id = %s",
            (ids[1],),
        )
    env = {**os.environ, "OUTBOX_DSN": role("operator")}

    def outbox_cli(*args):
        r = subprocess.run(
            [sys.executable, "-m", "relay", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert r.returncode in (0, 1), r.stderr
        return r

    assert json.loads(outbox_cli("status", "--json").stdout)["counts"]["FAILED"] == 1
    assert str(ids[0]) in outbox_cli("list", "--status", "FAILED").stdout
    assert "status:       FAILED" in outbox_cli("show", str(ids[0])).stdout
    assert "1 messages SKIPPED" in outbox_cli("skip", str(ids[0]), "--yes").stdout
    assert "1 messages back to PENDING" in outbox_cli("replay", str(ids[0]), "--yes").stdout
    assert "purge: 1 rows deleted" in outbox_cli("purge", "--older-than", "7d", "--yes").stdout
    assert len(json.loads(outbox_cli("audit", "--json").stdout)) == 3
    with psycopg.connect(dsn) as c:  # a consumer's inbox row, old enough to go
        c.execute(
            "INSERT INTO inbox_message (consumer_group, message_id, topic, kafka_partition, "
            "kafka_offset, processed_at) VALUES ('ledger', %s, 't', 0, 0, now() - "
            "interval '9 days')",
            (uuid.uuid4(),),
        )
    purged = outbox_cli("inbox", "purge", "--older-than", "7d", "--yes")
    assert "inbox purge: 1 rows deleted" in purged.stdout, purged.stderr
    # Every action above appended to the hash chain without UPDATE or DELETE on it.
    verified = outbox_cli("audit", "verify")
    assert verified.returncode == 0 and "valid: 4 entries checked" in verified.stdout
    with psycopg.connect(env["OUTBOX_DSN"]) as conn:
        for forbidden in (
            "UPDATE local_message_audit SET reason = 'x'",
            "DELETE FROM local_message_audit",
            "INSERT INTO local_message_audit (actor, action, selection, affected, db_user) "
            "VALUES ('x', 'skip', '{}', 0, 'someone_else')",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)
            conn.rollback()


def test_an_inbox_consumer_works_with_consumer_grants(role, dsn):
    import datetime as dt

    from outbox import inbox
    from tests.unit.inbox_fakes import message

    consumer_dsn = role("consumer")
    rec = message("t", 0, 5)
    with psycopg.connect(consumer_dsn) as conn:
        with conn.transaction():
            assert inbox.record(conn, "ledger", rec) is True
        with conn.transaction():
            assert inbox.record(conn, "ledger", rec) is False
    with psycopg.connect(dsn) as c:  # the owner ages the row
        c.execute("UPDATE inbox_message SET processed_at = now() - interval '9 days'")
    with psycopg.connect(consumer_dsn, autocommit=True) as conn:
        assert inbox.purge_inbox(conn, dt.timedelta(days=7), group="ledger") == 1
        for forbidden in (
            "SELECT message_id FROM local_message",
            "INSERT INTO local_message (topic, payload) VALUES ('t', 'x')",
            "UPDATE inbox_message SET topic = 'x'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)


def test_roles_granted_before_the_rate_limits_keep_working_after_migration_8(admin_dsn):
    """A writer, a relay and an operator granted as before schema v8 (the writer without
    SELECT on `tenant`, nobody with the new tables): after `outbox migrate` the writer still
    writes (its INSERT now registers its tenant), a relay can keep rate limits and the
    operator's status reads them, with no grant applied by hand."""
    from outbox.schema import migrations
    from relay.config import parse_rate_limits
    from relay.status import read_status
    from relay.store import PostgresStore
    from tests.conftest import with_dbname

    database = f"outbox_lp_{uuid.uuid4().hex[:8]}"
    names = {kind: f"lp_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("writer", "relay", "op")}
    before = {
        "writer": "GRANT SELECT (id, message_id, dedup_key), INSERT ON local_message TO {}",
        "relay": "GRANT SELECT ON local_message, local_message_schema TO {0}; "
        "GRANT UPDATE ON local_message_bucket TO {0}",
        "op": "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}",
    }
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        for name in names.values():
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(PASSWORD)
                )
            )
    owner_dsn = with_dbname(admin_dsn, database)
    try:
        with psycopg.connect(owner_dsn, autocommit=True) as conn:
            with conn.transaction():
                for number, body in migrations().items():
                    if number < 8:
                        conn.execute(body)
            for kind, name in names.items():
                conn.execute(
                    sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(sql.Identifier(name))
                )
                conn.execute(sql.SQL(before[kind]).format(sql.Identifier(name)))
            assert outbox.apply_schema(conn) == outbox.SCHEMA_VERSION

        def as_role(kind: str) -> str:
            return psycopg.conninfo.make_conninfo(owner_dsn, user=names[kind], password=PASSWORD)

        with psycopg.connect(as_role("writer")) as conn, conn.transaction():
            outbox.publish(conn, topic="t", payload={}, tenant="acme", dedup_key="d1")
            outbox.publish(conn, topic="t", payload={})
        store = PostgresStore(as_role("relay"))
        try:
            limits = parse_rate_limits("tenant:acme=5")
            assert store.known_tenants(["acme"]) == {"acme"}
            store.set_rate_limits(limits)
            assert store.take_tokens(limits, [10], [False]).granted == [5]
            store.register_tenants(["beta"])
            assert store.known_tenants(["beta"]) == {"beta"}
        finally:
            store.close()
        with psycopg.connect(as_role("op")) as conn:
            assert [(r["name"], r["rate"]) for r in read_status(conn, "public")["rate_limits"]] == [
                ("acme", 5.0)
            ]
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )
            for name in names.values():
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
