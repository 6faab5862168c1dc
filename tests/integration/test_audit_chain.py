"""The audit trail is a hash chain: the operator commands append to it, `outbox audit verify`
finds and names an entry edited, deleted, reordered or cut from the end by someone with the
table owner's rights, concurrent appenders never fork it, and an upgraded trail verifies."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

import outbox
from relay import audit, operations
from relay.cli import main
from relay.selection import Selection
from tests.conftest import with_dbname
from tests.outbox_command import run

HASH_ARGS = "prev_hash, id, at, actor, db_user, action, selection, affected, ids, reason"


def cli(*args, dsn):
    return CliRunner().invoke(main, list(args), env={"OUTBOX_DSN": dsn}, catch_exceptions=False)


def verify(dsn, *args):
    result = cli("audit", "verify", *args, dsn=dsn)
    return result.exit_code, result.output


def head(dsn) -> str:
    code, out = verify(dsn, "--json")
    assert code == 0, out
    return json.loads(out)["head"]


def failed_rows(dsn, n, topic="t", key=None):
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            ids = [
                p.id
                for p in outbox.publish_many(
                    conn, [dict(topic=topic, key=key, payload={"i": i}) for i in range(n)]
                )
            ]
        conn.execute("UPDATE local_message SET status = 'FAILED' WHERE id = ANY(%s)", (ids,))
    return ids


def trail(dsn, n=4):
    """N audit entries made by the CLI (replays of one FAILED row each); their ids, oldest
    first."""
    for row_id in failed_rows(dsn, n):
        result = cli("replay", str(row_id), "--yes", "--reason", f"row {row_id}", dsn=dsn)
        assert result.exit_code == 0, result.output
    with psycopg.connect(dsn) as c:
        return [r[0] for r in c.execute("SELECT id FROM local_message_audit ORDER BY id")]


def as_owner(dsn, *statements):
    with psycopg.connect(dsn) as c:  # the test database's owner, as any DBA could
        for statement in statements:
            c.execute(statement)


# --------------------------------------------------------------------------- appending


def test_every_operator_action_is_chained_and_the_trail_verifies(dsn):
    env = {"OUTBOX_DSN": dsn}
    ids = failed_rows(dsn, 3, key="acct-1")
    assert run("skip", str(ids[0]), "--yes", "--reason", "bad event", env=env).returncode == 0
    assert run("replay", str(ids[1]), "--yes", "--actor", "bob@pager", env=env).returncode == 0
    as_owner(
        dsn,
        "UPDATE local_message SET status = 'CONFIRMED', created_at = now() - interval '9 days' "
        f"WHERE id = {ids[2]}",
        "INSERT INTO inbox_message (consumer_group, message_id, processed_at) "
        f"VALUES ('ledger', '{uuid.uuid4()}', now() - interval '9 days')",
    )
    purged = run("purge", "--older-than", "7d", "--yes", "--reason", "retention", env=env)
    assert "purge: 1 rows deleted" in purged.stdout, purged.stderr
    inbox = run(
        "inbox", "purge", "--older-than", "7d", "--group", "ledger", "--yes",
        "--actor", "carol@cron", "--reason", "inbox retention", env=env,
    )  # fmt: skip
    assert "inbox purge: 1 rows deleted" in inbox.stdout, inbox.stderr

    entries = json.loads(run("audit", "--json", env=env).stdout)
    assert [(e["action"], e["affected"], e["reason"]) for e in entries] == [
        ("inbox-purge", 1, "inbox retention"),
        ("purge", 1, "retention"),
        ("replay", 1, None),
        ("skip", 1, "bad event"),
    ]
    assert entries[0]["actor"] == "carol@cron"
    assert entries[0]["selection"] == {"older_than": "7d", "group": "ledger"}
    assert entries[2]["actor"] == "bob@pager"
    # Each entry names the one before it; the first names none.
    assert [e["prev_hash"] for e in entries] == [e["hash"] for e in entries[1:]] + [None]

    verified = run("audit", "verify", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip() == (
        f"audit trail valid: 4 entries checked, head {entries[0]['hash']} "
        f"(entry {entries[0]['id']})"
    )


def test_an_empty_trail_is_valid_and_an_expected_head_is_not_there(dsn):
    code, out = verify(dsn)
    assert (code, out.strip()) == (
        0,
        "audit trail valid: 0 entries checked, no head (the trail is empty)",
    )
    code, out = verify(dsn, "--expect-head", "ab" * 32)
    assert code == 1 and "truncated: no entry has the expected head" in out
    assert "it is empty" in out


def test_the_database_sets_the_hashes_whatever_the_insert_says(dsn):
    trail(dsn, 1)
    with psycopg.connect(dsn) as c:
        c.execute(
            "INSERT INTO local_message_audit (actor, action, selection, affected, prev_hash, "
            "hash) VALUES ('x', 'skip', '{}', 0, '\\x00', '\\x00')"
        )
        rows = c.execute(
            f"SELECT prev_hash, hash, hash = local_message_audit_hash({HASH_ARGS}) "
            "FROM local_message_audit ORDER BY id"
        ).fetchall()
    assert rows[1][0] == rows[0][1] and rows[1][2] is True
    assert verify(dsn)[0] == 0


def test_appending_outside_read_committed_is_refused(dsn):
    """Under a snapshot taken before the chain's lock, the newest entry could be invisible and
    two entries would share a predecessor: the trigger refuses rather than fork the chain."""
    with psycopg.connect(dsn) as c:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.RaiseException, match="READ COMMITTED"):
            c.execute(
                "INSERT INTO local_message_audit (actor, action, selection, affected) "
                "VALUES ('x', 'skip', '{}', 0)"
            )


# --------------------------------------------------------------------------- tampering


@pytest.mark.parametrize(
    "change",
    [
        "affected = affected + 1",
        "reason = 'it was fine'",
        "actor = 'someone-else@host'",
        "ids = ARRAY[1]::bigint[]",
        "at = at - interval '1 day'",
        'selection = \'{"statuses": ["FAILED"]}\'',
    ],
)
def test_an_edited_entry_is_named(dsn, change):
    ids = trail(dsn)
    assert verify(dsn)[0] == 0
    as_owner(dsn, f"UPDATE local_message_audit SET {change} WHERE id = {ids[1]}")
    code, out = verify(dsn)
    assert code == 1
    assert out.splitlines() == [
        f"entry {ids[1]} edited: its contents do not match its hash",
        f"audit trail NOT valid: 1 findings in 4 entries checked, head {head_of(dsn)} "
        f"(entry {ids[3]})",
    ]


def head_of(dsn):
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT encode(hash, 'hex') FROM local_message_audit ORDER BY id DESC")
        return row.fetchone()[0]


def test_a_deleted_middle_entry_is_named(dsn):
    ids = trail(dsn)
    as_owner(dsn, f"DELETE FROM local_message_audit WHERE id = {ids[1]}")
    code, out = verify(dsn)
    assert code == 1
    assert out.splitlines()[0] == (
        f"entry after id {ids[0]} deleted: entry {ids[2]} links to a hash no entry has "
        f"(or entry {ids[0]} was rewritten together with its hash)"
    )
    assert "1 findings in 3 entries" in out
    report = json.loads(verify(dsn, "--json")[1])
    assert report["valid"] is False
    assert [(f["kind"], f["id"]) for f in report["findings"]] == [("deleted", ids[2])]


def test_a_deleted_first_entry_is_named(dsn):
    ids = trail(dsn)
    as_owner(dsn, f"DELETE FROM local_message_audit WHERE id = {ids[0]}")
    code, out = verify(dsn)
    assert code == 1 and out.splitlines()[0] == (
        f"entry before id {ids[1]} deleted: the first entry links to a hash no entry has"
    )


def test_swapped_entries_are_named_as_reordered(dsn):
    """Two entries' whole contents (their hashes too) swapped between their ids."""
    ids = trail(dsn)
    a, b = ids[1], ids[2]
    as_owner(
        dsn,
        "UPDATE local_message_audit x SET at = y.at, actor = y.actor, db_user = y.db_user, "
        "action = y.action, selection = y.selection, affected = y.affected, ids = y.ids, "
        "reason = y.reason, prev_hash = y.prev_hash, hash = y.hash "
        f"FROM local_message_audit y WHERE (x.id, y.id) IN (({a}, {b}), ({b}, {a}))",
    )
    code, out = verify(dsn)
    assert code == 1
    lines = out.splitlines()
    assert f"entries reordered: entry {a} links to entry {b}, not to entry {ids[0]} before it" in (
        lines
    )
    assert f"entries reordered: entry {b} links to entry {ids[0]}, not to entry {a} before it" in (
        lines
    )
    assert f"entries reordered: entry {ids[3]} links to entry {a}, not to entry {b} before it" in (
        lines
    )
    # The id is hashed too: an entry moved to another id no longer matches its hash.
    assert f"entry {a} edited: its contents do not match its hash" in lines


def test_a_cut_tail_is_caught_only_against_a_recorded_head(dsn):
    ids = trail(dsn)
    recorded = head(dsn)
    as_owner(dsn, f"DELETE FROM local_message_audit WHERE id = {ids[-1]}")
    # What the chain alone cannot show: the remaining entries still link up.
    assert verify(dsn)[0] == 0
    code, out = verify(dsn, "--expect-head", recorded)
    assert code == 1
    assert out.splitlines()[0] == (
        f"truncated: no entry has the expected head {recorded}; the chain now ends at id "
        f"{ids[-2]} (entries after it deleted, or the chain rewritten)"
    )
    assert json.loads(verify(dsn, "--expect-head", recorded, "--json")[1])["findings"] == [
        {
            "kind": "truncated",
            "id": ids[-2],
            "message": out.splitlines()[0],
        }
    ]


def test_a_recorded_head_with_entries_appended_since_is_fine(dsn):
    trail(dsn, 2)
    recorded = head(dsn)
    trail(dsn, 2)
    assert verify(dsn, "--expect-head", recorded.upper())[0] == 0


def test_a_rewritten_chain_verifies_but_not_against_the_recorded_head(dsn):
    """The owner edits an entry and recomputes every hash from there on with the documented
    function: the chain is consistent again, which is why the head must be kept elsewhere."""
    ids = trail(dsn)
    recorded = head(dsn)
    as_owner(dsn, f"UPDATE local_message_audit SET affected = 0 WHERE id = {ids[1]}")
    code, out = verify(dsn)
    assert code == 1 and f"entry {ids[1]} edited" in out
    as_owner(dsn, f"UPDATE local_message_audit SET hash = local_message_audit_hash({HASH_ARGS}) "
                  f"WHERE id = {ids[1]}")  # fmt: skip
    code, out = verify(dsn)
    assert code == 1 and out.splitlines()[0].startswith(
        f"entry after id {ids[1]} deleted: entry {ids[2]} links to a hash no entry has "
        f"(or entry {ids[1]} was rewritten together with its hash)"
    )
    for later in ids[2:]:
        as_owner(
            dsn,
            f"UPDATE local_message_audit SET prev_hash = (SELECT hash FROM local_message_audit "
            f"WHERE id < {later} ORDER BY id DESC LIMIT 1) WHERE id = {later}",
            f"UPDATE local_message_audit SET hash = local_message_audit_hash({HASH_ARGS}) "
            f"WHERE id = {later}",
        )
    assert verify(dsn)[0] == 0
    code, out = verify(dsn, "--expect-head", recorded)
    assert code == 1 and "truncated: no entry has the expected head" in out


# --------------------------------------------------------------------------- concurrency


def test_concurrent_replays_chain_one_after_the_other(dsn):
    """Two operators, 20 replays each, at the same time: every entry has a predecessor of its
    own and the chain verifies."""
    rows = failed_rows(dsn, 40)
    start = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def operator(name: str, mine: list[int]) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                start.wait()
                for row_id in mine:
                    changed = operations.replay(conn, "public", Selection(ids=[row_id]), name)
                    assert changed == [row_id]
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [
        threading.Thread(target=operator, args=("alice", rows[0::2])),
        threading.Thread(target=operator, args=("bob", rows[1::2])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "the replays did not finish in 120 s"
    assert errors == []
    with psycopg.connect(dsn) as c:
        links = c.execute("SELECT prev_hash, actor FROM local_message_audit ORDER BY id").fetchall()
    assert len(links) == 40 and {actor for _, actor in links} == {"alice", "bob"}
    assert len({prev for prev, _ in links}) == 40, "two entries share a predecessor"
    code, out = verify(dsn)
    assert code == 0 and "40 entries checked" in out, out


def test_an_appender_that_waits_for_the_lock_gets_the_next_id_and_chains_to_the_last(dsn):
    """Deterministic: A has appended in an open transaction; B's append waits for A's lock
    before its id is drawn; A appends again and commits; B's entry comes after both."""
    insert = (
        "INSERT INTO local_message_audit (actor, action, selection, affected) "
        "VALUES (%s, 'skip', '{}', 0) RETURNING id"
    )
    with psycopg.connect(dsn) as a, psycopg.connect(dsn, autocommit=True) as b:
        first = a.execute(insert, ("A",)).fetchone()[0]
        b_pid = b.info.backend_pid
        got: dict[str, object] = {}

        def append_b() -> None:
            try:
                got["B"] = b.execute(insert, ("B",)).fetchone()[0]
            except psycopg.Error as exc:  # the test says what went wrong below
                got["B"] = exc

        waiter = threading.Thread(target=append_b)
        waiter.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as watch:
                for _ in range(300):  # up to 30 s, by the server's own clock
                    waiting = watch.execute(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                        (b_pid,),
                    ).fetchone()
                    if waiting and waiting[0]:
                        break
                    watch.execute("SELECT pg_sleep(0.1)")
                else:
                    pytest.fail("B never waited for A's lock")
            second = a.execute(insert, ("A",)).fetchone()[0]
            a.commit()
        finally:
            waiter.join(timeout=30)
        assert not waiter.is_alive()
    assert isinstance(got["B"], int), f"B's append failed: {got['B']}"
    assert first < second < got["B"]
    with psycopg.connect(dsn) as c:
        prev_of_b, hash_of_second = c.execute(
            "SELECT (SELECT prev_hash FROM local_message_audit WHERE id = %s), "
            "(SELECT hash FROM local_message_audit WHERE id = %s)",
            (got["B"], second),
        ).fetchone()
    assert prev_of_b == hash_of_second
    assert verify(dsn)[0] == 0


# --------------------------------------------------------------------------- encoding


def test_the_verifier_and_the_database_hash_alike(dsn):
    """The trigger writes with local_message_audit_hash() and verify recomputes with
    relay.audit.entry_hash: the two implementations of the encoding give the same hash, on
    entries with NULLs, non-ASCII text, empty strings and arrays, NULL array elements, explicit
    array bounds and a time before 1970."""
    with psycopg.connect(dsn) as c:
        c.execute(
            "INSERT INTO local_message_audit (actor, action, selection, affected, ids, reason) "
            "VALUES ('zoë@host', 'replay', %s, 3, ARRAY[7, 8, 12], 'ünïcode, \"quotes\"'), "
            "('b', 'purge', '{}', 0, NULL, NULL), ('c', 'skip', '[]', 0, '{}', ''), "
            "('', 'skip', '{\"ключ\": \"値\", \"a\": [1, 2.50, null]}', -1, '{1,NULL,2}', "
            "'emoji 🧾'), ('d', 'replay', '\"\"', 2, '[5:6]={1,2}', NULL)",
            (json.dumps({"ids": ["7"], "topic": "pay-ments", "key": "k\\x00"}),),
        )
        c.execute(
            "INSERT INTO local_message_audit (at, actor, db_user, action, selection, affected) "
            "VALUES ('1969-12-31 23:59:59.999999+00', 'e', '', 'skip', '{}', 0)"
        )
        rows = c.execute(
            "SELECT prev_hash, id, at, actor, db_user, action, selection::text, affected, "
            "ids::text, reason, hash FROM local_message_audit ORDER BY id"
        ).fetchall()
    assert len(rows) == 6
    assert [r[8] for r in rows] == ["{7,8,12}", None, "{}", "{1,NULL,2}", "[5:6]={1,2}", None]
    for row in rows:
        assert audit.entry_hash(*row[:10]) == row[10], row
    assert verify(dsn)[0] == 0


@pytest.mark.parametrize(
    "written, edited",
    [
        ("'{1,NULL,2}'", "'{1,2}'"),
        ("'{1,2}'", "'{1,NULL,2}'"),
        ("'[5:6]={1,2}'", "'{1,2}'"),
        ("'{}'", "NULL"),
    ],
)
def test_ids_edited_to_the_same_numbers_are_named(dsn, written, edited):
    """The ids are hashed in their array text form: a NULL element or explicit bounds added or
    removed is an edit too."""
    ids = trail(dsn, 2)
    with psycopg.connect(dsn) as c:
        (entry,) = c.execute(
            "INSERT INTO local_message_audit (actor, action, selection, affected, ids) "
            f"VALUES ('x', 'replay', '{{}}', 2, {written}) RETURNING id"
        ).fetchone()
    trail(dsn, 1)
    assert verify(dsn)[0] == 0
    as_owner(dsn, f"UPDATE local_message_audit SET ids = {edited} WHERE id = {entry}")
    code, out = verify(dsn)
    assert code == 1
    assert out.splitlines()[0] == f"entry {entry} edited: its contents do not match its hash"
    assert f"1 findings in {len(ids) + 2} entries" in out


def test_a_replaced_hash_function_does_not_vouch_for_an_edited_entry(dsn):
    """The owner who edits an entry can also replace local_message_audit_hash(), here by one
    that returns whatever hash is stored: verify does not use it, and names the entry."""
    ids = trail(dsn)
    recorded = head(dsn)
    as_owner(
        dsn,
        "CREATE OR REPLACE FUNCTION local_message_audit_hash(prev bytea, entry_id bigint, "
        "entry_at timestamptz, entry_actor text, entry_db_user text, entry_action text, "
        "entry_selection jsonb, entry_affected bigint, entry_ids bigint[], entry_reason text) "
        "RETURNS bytea LANGUAGE sql STABLE AS "
        "$$ SELECT hash FROM local_message_audit WHERE id = entry_id $$",
        f"UPDATE local_message_audit SET affected = 0, reason = 'nothing happened' "
        f"WHERE id = {ids[1]}",
    )
    with psycopg.connect(dsn) as c:  # the replaced function says every entry is intact
        assert c.execute(
            f"SELECT bool_and(hash = local_message_audit_hash({HASH_ARGS})) "
            "FROM local_message_audit"
        ).fetchone() == (True,)
    for args in ((), ("--expect-head", recorded)):
        code, out = verify(dsn, *args)
        assert code == 1, out
        assert out.splitlines() == [
            f"entry {ids[1]} edited: its contents do not match its hash",
            f"audit trail NOT valid: 1 findings in 4 entries checked, head {recorded} "
            f"(entry {ids[3]})",
        ]


# --------------------------------------------------------------------------- upgrade


def test_a_v4_trail_upgraded_by_migrate_verifies_the_same_everywhere(admin_dsn):
    """Entries written before version 5 are chained by the migration, in id order and
    deterministically: two copies of the same trail upgrade to the same head."""
    from outbox.schema import migrations

    name = f"outbox_audit_up_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db = with_dbname(admin_dsn, name)
    try:
        with psycopg.connect(db, autocommit=True) as conn:
            for schema in ("one", "two"):
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                with conn.transaction():
                    conn.execute(
                        sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema))
                    )
                    for number, body in migrations().items():
                        if number <= 4:
                            conn.execute(body)
                    conn.execute(
                        "INSERT INTO local_message_audit (at, actor, db_user, action, selection, "
                        "affected, ids, reason) VALUES "
                        "('2026-01-05 10:00:00.123456+00', 'a@h', 'ops', 'replay', "
                        "'{\"ids\": [\"1\"]}', 1, '{1}', 'topic created'), "
                        "('2026-01-05 11:00:00+00', 'b@h', 'ops', 'skip', '{}', 2, '{2,3}', NULL), "
                        "('2026-01-06 00:00:00+00', 'c@h', 'ops', 'purge', '{}', 500, NULL, NULL)"
                    )
                assert outbox.installed_version(conn, schema) == 4
        heads = []
        for schema in ("one", "two"):
            env = {"OUTBOX_DSN": db, "OUTBOX_SCHEMA": schema}
            migrated = run("migrate", env=env)
            assert migrated.stdout.strip() == (
                f"outbox schema {schema}: version {outbox.SCHEMA_VERSION} (was 4)"
            ), migrated.stderr
            verified = run("audit", "verify", "--json", env=env)
            assert verified.returncode == 0, verified.stdout + verified.stderr
            report = json.loads(verified.stdout)
            assert (report["valid"], report["entries"], report["head_id"]) == (True, 3, 3)
            heads.append(report["head"])
            listed = json.loads(run("audit", "--json", env=env).stdout)
            assert [e["action"] for e in listed] == ["purge", "skip", "replay"]
        assert heads[0] == heads[1]
        with psycopg.connect(db, autocommit=True) as conn:  # and an upgraded trail is guarded
            conn.execute("UPDATE one.local_message_audit SET affected = 2 WHERE id = 1")
        tampered = run("audit", "verify", env={"OUTBOX_DSN": db, "OUTBOX_SCHEMA": "one"})
        assert tampered.returncode == 1
        assert (
            tampered.stdout.splitlines()[0] == "entry 1 edited: its contents do not match its hash"
        )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# --------------------------------------------------------------------------- filters


def test_audit_filters_by_action_actor_and_time(dsn):
    with psycopg.connect(dsn) as c:
        c.execute(
            "INSERT INTO local_message_audit (at, actor, action, selection, affected) VALUES "
            "(now() - interval '3 days', 'Alice@box', 'replay', '{}', 1), "
            "(now() - interval '30 hours', 'bob@box', 'skip', '{}', 2), "
            "(now() - interval '2 hours', 'alice@cron', 'purge', '{}', 3), "
            "(now() - interval '1 minute', 'carol@cron', 'inbox-purge', '{}', 4)"
        )

    def affected(*args):
        result = cli("audit", "--json", *args, dsn=dsn)
        assert result.exit_code == 0, result.output
        return [e["affected"] for e in json.loads(result.output)]

    assert affected() == [4, 3, 2, 1]
    assert affected("--action", "replay") == [1]
    assert affected("--action", "skip", "--action", "inbox-purge") == [4, 2]
    assert affected("--actor", "ALICE") == [3, 1]
    assert affected("--actor", "@cron", "--action", "purge") == [3]
    assert affected("--since", "1d") == [4, 3]
    assert affected("--until", "1d") == [2, 1]
    assert affected("--since", "2d", "--until", "1h") == [3, 2]
    assert affected("--limit", "1") == [4]
    today = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    assert affected("--since", today.isoformat()) == [4]
    text = cli("audit", "--action", "inbox-purge", dsn=dsn).output
    assert "inbox-purge       4 rows  by carol@cron" in text and len(text.splitlines()) == 1


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_a_usage_exit(dsn):
    env = {"OUTBOX_DSN": dsn}
    for args, says in (
        (["audit", "verify", "--expect-head", "nothex"], "64 hexadecimal characters"),
        (["audit", "verify", "--expect-head", "ab" * 31], "64 hexadecimal characters"),
        (["audit", "--since", "yesterday"], "not a time: 'yesterday'"),
        (["audit", "--until", "5 parsecs"], "not a time"),
        (["purge", "--older-than", "a week", "--yes"], "not a duration"),
        (["inbox", "purge", "--older-than", "7 days", "--yes"], "not a duration"),
    ):
        r = run(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and says in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    bad_action = run("audit", "--action", "drop", env=env)
    assert bad_action.returncode == 2 and "'drop' is not one of" in bad_action.stderr


def test_a_wrong_dsn_is_one_line_without_the_password():
    bad = "postgresql://outbox:wr0ngpass@127.0.0.1:1/none"
    for args in (["audit"], ["audit", "verify"], ["audit", "verify", "--dsn", bad]):
        r = run(*args, env={"OUTBOX_DSN": bad})
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("error: cannot connect to postgresql://outbox:***@127.0.0.1:1")
        assert "wr0ngpass" not in r.stdout + r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    # The group's --dsn reaches verify too.
    r = run("audit", "--dsn", bad, "verify", env={"OUTBOX_DSN": ""})
    assert r.returncode == 1 and "cannot connect to postgresql://outbox:***@" in r.stderr
