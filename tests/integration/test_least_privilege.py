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
