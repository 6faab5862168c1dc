"""The `outbox` command, through click's runner and as a real process, against the real
PostgreSQL (and Kafka where it matters)."""

import json

import psycopg
from click.testing import CliRunner

import outbox
from relay.cli import main
from relay.relay import Relay
from relay.store import PostgresStore
from relay.testing import RecordingSink
from tests.integration.test_relay_kafka import drain
from tests.kafka_helpers import create_topic, delete_topic, read_all
from tests.outbox_command import run


def cli(*args, env=None, input=None):
    return CliRunner().invoke(main, list(args), env=env or {}, input=input, catch_exceptions=False)


def set_status(dsn, status, where="true", **cols):
    with psycopg.connect(dsn) as c:
        c.execute(f"UPDATE local_message SET status = %s WHERE {where}", (status,))


def test_stuck_message_found_understood_and_replayed(dsn, bootstrap, topic):
    """The 3 a.m. story: a topic is missing, its message FAILED and holds its key. The operator
    finds it, sees why, creates the topic, replays it, and the key flows in order."""
    missing = topic + ".late"
    with psycopg.connect(dsn) as conn, conn.transaction():
        stuck = outbox.publish(conn, topic=missing, key="acct-7", payload={"n": 1})
        outbox.publish(conn, topic=topic, key="acct-7", payload={"n": 2})
        outbox.publish(conn, topic=topic, key="acct-8", payload={"n": 3})
    drain(dsn, bootstrap, max_attempts=1)
    env = {"OUTBOX_DSN": dsn}

    status = run("status", "--fail-if-failed", env=env)
    assert status.returncode == 1
    assert "keys blocked by a FAILED (or SENT) row: 1" in status.stdout
    assert f"key acct-7: FAILED row {stuck.id}, 1 rows held behind it" in status.stdout
    assert "PROBLEM: 1 FAILED rows" in status.stdout

    listed = run("list", "--status", "FAILED", env=env)
    assert listed.returncode == 0 and str(stuck.id) in listed.stdout
    assert "UNKNOWN_TOPIC" in listed.stdout

    shown = run("show", str(stuck.message_id), env=env)
    assert "status:       FAILED" in shown.stdout and missing in shown.stdout
    assert "1 later rows of this key wait behind it" in shown.stdout
    assert '"n": 1' in shown.stdout

    create_topic(bootstrap, missing, partitions=1)
    try:
        dry = run("replay", "--status", "FAILED", "--error", "unknown_topic", "--dry-run", env=env)
        assert "replay: 1 messages match (FAILED 1)" in dry.stdout
        refused = run("replay", "--status", "FAILED", env=env)  # no terminal, no --yes
        assert refused.returncode == 2 and "--yes" in refused.stderr
        done = run(
            "replay",
            "--status",
            "FAILED",
            "--error",
            "UNKNOWN_TOPIC",
            "--yes",
            "--actor",
            "oncall@pager",
            "--reason",
            "topic created",
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "replay: 1 messages back to PENDING" in done.stdout
        drain(dsn, bootstrap)
        assert [json.loads(m.value) for m in read_all(bootstrap, missing, expected=1)] == [{"n": 1}]
        assert sorted(json.loads(m.value)["n"] for m in read_all(bootstrap, topic, 2)) == [2, 3]
        with psycopg.connect(dsn) as c:
            rows = c.execute(
                "SELECT id, status, delivered_at FROM local_message ORDER BY id"
            ).fetchall()
        assert [r[1] for r in rows] == ["CONFIRMED"] * 3
        assert rows[0][2] <= rows[1][2], "the held row did not go out before the replayed one"
        trail = json.loads(run("audit", "--json", env=env).stdout)
        assert trail[0]["action"] == "replay" and trail[0]["actor"] == "oncall@pager"
        assert trail[0]["ids"] == [stuck.id] and trail[0]["reason"] == "topic created"
        assert trail[0]["selection"] == {"statuses": ["FAILED"], "error": "UNKNOWN_TOPIC"}
        assert run("status", "--fail-if-failed", "--fail-if-lag", "60", env=env).returncode == 0
    finally:
        delete_topic(bootstrap, missing)


def test_skip_unblocks_a_key_and_is_audited(dsn, bootstrap, topic):
    with psycopg.connect(dsn) as conn, conn.transaction():
        poison = outbox.publish(conn, topic=topic + ".nope", key="k", payload={"n": 1})
        outbox.publish(conn, topic=topic, key="k", payload={"n": 2})
    drain(dsn, bootstrap, max_attempts=1)
    env = {"OUTBOX_DSN": dsn}
    result = cli("skip", str(poison.id), "--yes", "--reason", "bad topic name", env=env)
    assert result.exit_code == 0, result.output
    assert "skip: 1 messages SKIPPED" in result.output
    drain(dsn, bootstrap)
    assert [json.loads(m.value) for m in read_all(bootstrap, topic, expected=1)] == [{"n": 2}]
    assert cli("skip", "--status", "CONFIRMED", "--yes", env=env).exit_code == 2
    entries = json.loads(cli("audit", "--json", env=env).output)
    assert entries[0]["action"] == "skip" and entries[0]["ids"] == [poison.id]


def test_list_filters_and_pages(conn, dsn):
    with conn.transaction():
        outbox.publish_many(
            conn,
            [
                dict(topic="a" if i % 2 else "b", key=f"k{i % 3}", payload={"i": i})
                for i in range(30)
            ],
        )
    env = {"OUTBOX_DSN": dsn}
    page = json.loads(cli("list", "--topic", "a", "--limit", "5", "--json", env=env).output)
    assert [r["topic"] for r in page] == ["a"] * 5
    after = page[-1]["id"]
    nxt = json.loads(
        cli(
            "list", "--topic", "a", "--limit", "5", "--after-id", str(after), "--json", env=env
        ).output
    )
    assert nxt[0]["id"] > after and len(nxt) == 5
    assert (
        len(json.loads(cli("list", "--key", "k1", "--limit", "100", "--json", env=env).output))
        == 10
    )
    nothing = cli("list", "--since", "1h", "--until", "2h", "--json", env=env)
    assert nothing.exit_code == 1 and json.loads(nothing.stdout) == []
    assert nothing.stderr.startswith("error: no message matches since=")
    # Why a PENDING row waits: held behind its key's FAILED row, or its next try.
    k0 = [r["id"] for r in json.loads(cli("list", "--key", "k0", "--json", env=env).stdout)]
    k1 = [r["id"] for r in json.loads(cli("list", "--key", "k1", "--json", env=env).stdout)]
    conn.execute("UPDATE local_message SET status = 'FAILED' WHERE id = %s", (k0[0],))
    conn.execute(
        "UPDATE local_message SET attempts = 1, next_attempt_at = now() + interval '1 hour'"
        " WHERE id = %s",
        (k1[0],),
    )
    conn.commit()
    rows = json.loads(cli("list", "--key", "k0", "--json", env=env).stdout)
    assert [r["held_by"] for r in rows] == [None] + [k0[0]] * (len(k0) - 1)
    text = cli("list", "--key", "k1", env=env).output
    assert "retry in 3599s" in text or "retry in 3600s" in text
    assert text.count(f"held by {k1[0]}") == len(k1) - 1
    assert "held by" not in cli("list", "--key", "k2", env=env).output
    assert "(more: --after-id" in cli("list", "--limit", "3", env=env).output
    bad = cli("list", "--since", "yesterday", env=env)
    assert bad.exit_code == 2 and "not a time" in bad.output


def test_a_change_that_matches_nothing_or_changes_nothing_exits_1(conn, dsn):
    """A script must tell "replayed" from "nothing to replay", as `show` of a missing id does."""
    with conn.transaction():
        fresh = outbox.publish(conn, topic="t", key="k", payload={}).id
    env = {"OUTBOX_DSN": dsn}
    for action in ("replay", "skip"):
        missing = run(action, "999999", "--yes", env=env)
        assert missing.returncode == 1, missing
        assert missing.stderr == f"error: {action}: no message matches ids=['999999']\n"
        assert run(action, "--topic", "no.such", "--dry-run", env=env).returncode == 1
    # A PENDING row never tried: it matches, but replay cannot change it; the dry run says so.
    dry = run("replay", "--status", "PENDING", "--dry-run", env=env)
    assert dry.returncode == 1 and "0 of 1 matching messages can be changed" in dry.stdout
    assert "none of the 1 matching messages can be changed" in dry.stderr
    assert run("replay", "--status", "PENDING", "--yes", env=env).returncode == 1
    assert run("skip", str(fresh), "--yes", env=env).returncode == 1  # not FAILED
    assert run("show", "999999", env=env).returncode == 1
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM local_message_audit").fetchone() == (0,)


def test_replay_of_confirmed_rows_resends_them(conn, dsn):
    with conn.transaction():
        ids = [p.id for p in outbox.publish_many(conn, [dict(topic="t", payload={})] * 3)]
    set_status(dsn, "CONFIRMED")
    env = {"OUTBOX_DSN": dsn}
    assert cli("replay", env=env).exit_code == 2, "an empty selection is refused"
    result = cli("replay", "--status", "CONFIRMED", str(ids[0]), "--yes", env=env)
    assert result.exit_code == 0 and "1 messages back to PENDING" in result.output
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT status FROM local_message ORDER BY id").fetchall() == [
            ("PENDING",),
            ("CONFIRMED",),
            ("CONFIRMED",),
        ]


def test_replay_in_batches_with_one_audit_row_per_batch(conn, dsn):
    with conn.transaction():
        outbox.publish_many(conn, [dict(topic="t", payload={})] * 2500)
    set_status(dsn, "FAILED")
    result = cli("replay", "--status", "FAILED", "--yes", env={"OUTBOX_DSN": dsn})
    assert "replay: 2500 messages back to PENDING" in result.output
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT affected FROM local_message_audit ORDER BY id").fetchall() == [
            (1000,),
            (1000,),
            (500,),
        ]


def test_purge_deletes_only_old_confirmed_and_skipped_rows(conn, dsn):
    with conn.transaction():
        outbox.publish_many(conn, [dict(topic="t", payload={})] * 2500)
    with psycopg.connect(dsn) as c:
        c.execute(
            "UPDATE local_message SET created_at = now() - interval '10 days', "
            "status = CASE WHEN id % 5 = 0 THEN 'PENDING' WHEN id % 5 = 1 THEN 'FAILED' "
            "WHEN id % 5 = 2 THEN 'SKIPPED' ELSE 'CONFIRMED' END"
        )
        c.execute(
            "INSERT INTO local_message (topic, payload, status) VALUES ('t', 'x', 'CONFIRMED')"
        )
    env = {"OUTBOX_DSN": dsn}
    dry = cli("purge", "--older-than", "7d", "--dry-run", env=env)
    assert "purge: 1000 CONFIRMED rows created before" in dry.output
    done = cli("purge", "--older-than", "7d", "--include-skipped", "--yes", env=env)
    assert "purge: 1500 rows deleted" in done.output, done.output
    with psycopg.connect(dsn) as c:
        left = dict(c.execute("SELECT status, count(*) FROM local_message GROUP BY 1").fetchall())
        audit = c.execute("SELECT action, affected FROM local_message_audit").fetchall()
    assert left == {"PENDING": 500, "FAILED": 500, "CONFIRMED": 1}
    assert audit == [("purge", 1000), ("purge", 500)]  # one entry per batch, as it committed


def test_status_json_fields(conn, dsn):
    with conn.transaction():
        outbox.publish(conn, topic="t", key="k", payload={})
    report = json.loads(cli("status", "--json", env={"OUTBOX_DSN": dsn}).output)
    assert set(report) >= {
        "schema",
        "schema_version",
        "counts",
        "by_topic",
        "oldest_pending_age_seconds",
        "held",
        "topics",
        "in_backoff",
        "blocked_key_count",
        "blocked_keys",
        "relays",
        "problems",
    }
    assert report["counts"]["PENDING"] == 1 and report["by_topic"] == {"t": {"PENDING": 1}}
    lagging = cli("status", "--fail-if-lag", "0", env={"OUTBOX_DSN": dsn})
    assert lagging.exit_code == 1 and "PROBLEM: lag" in lagging.output


def test_rows_held_behind_a_poisoned_key_are_not_lag_in_status_or_gauge(conn, dsn):
    """One poisoned key must not fire the lag alert: its held rows show as held, in `outbox
    status` and in the relay's gauges alike, and a row the relay may send is lag again."""
    with conn.transaction():
        for _ in range(4):
            outbox.publish(conn, topic="t", key="poisoned", payload={})
    conn.execute(
        "UPDATE local_message SET status = 'FAILED' WHERE id = (SELECT min(id) FROM local_message)"
    )
    conn.commit()
    relay = Relay(PostgresStore(dsn), RecordingSink(), reader=PostgresStore(dsn), name="gauges")
    try:
        assert relay.run_once() == 0  # its heartbeat sets the gauges; nothing may be sent
        gauge = relay.metrics.registry.get_sample_value
        report = json.loads(cli("status", "--json", env={"OUTBOX_DSN": dsn}).output)
        assert report["held"] == gauge("outbox_held_messages") == 3
        assert report["oldest_pending_age_seconds"] is None
        assert gauge("outbox_oldest_claimable_age_seconds") == 0.0
        assert report["topics"]["t"] == {
            "counts": {"FAILED": 1, "PENDING": 3},
            "lag_seconds": None,
            "held": 3,
            "delivered_per_second": 0.0,
        }
        assert report["blocked_keys"][0]["held"] == 3
        text = cli("status", "--fail-if-lag", "0", env={"OUTBOX_DSN": dsn})
        assert text.exit_code == 0 and "held behind a blocked key: 3" in text.output
        # Held rows are not lag; what shows the stall is the blocked key (and its FAILED row).
        assert cli("status", "--fail-if-failed", env={"OUTBOX_DSN": dsn}).exit_code == 1
        with conn.transaction():
            outbox.publish(conn, topic="u", key="fresh", payload={})
        report = json.loads(cli("status", "--json", env={"OUTBOX_DSN": dsn}).output)
        assert report["topics"]["u"]["lag_seconds"] is not None
        assert report["oldest_pending_age_seconds"] == report["topics"]["u"]["lag_seconds"]
        assert cli("status", "--fail-if-lag", "0", env={"OUTBOX_DSN": dsn}).exit_code == 1
    finally:
        relay.close_stores()


def test_a_key_held_by_a_sent_row_shows_as_blocked_and_fails_the_probe(conn, dsn):
    """SENT (the original design's claim) holds its key until replay --expired-claims: its
    held rows are not lag, so the key must show as blocked, and --fail-if-failed fire."""
    with conn.transaction():
        for _ in range(3):
            outbox.publish(conn, topic="t", key="claimed", payload={})
    conn.execute(
        "UPDATE local_message SET status = 'SENT', claim_expires_at = now() - interval '1m'"
        " WHERE id = (SELECT min(id) FROM local_message)"
    )
    conn.commit()
    env = {"OUTBOX_DSN": dsn}
    report = json.loads(cli("status", "--json", env=env).stdout)
    assert report["blocked_key_count"] == 1 and report["blocked_keys"][0]["held"] == 2
    probe = cli("status", "--fail-if-failed", env=env)
    assert probe.exit_code == 1 and "1 SENT rows (outbox replay --expired-claims)" in probe.output


def test_status_watch_refreshes_with_the_delivery_rate_per_topic(conn, dsn):
    with conn.transaction():
        for i in range(6):
            outbox.publish(conn, topic="a" if i < 4 else "b", key=f"k{i}", payload={})
    # Three rows of topic a in every window (delivered "in a minute": the test must not
    # depend on how fast it runs), one an hour ago (in none).
    conn.execute(
        "UPDATE local_message SET status = 'CONFIRMED', delivered_at = now() + interval '1m'"
        " WHERE id IN"
        " (SELECT id FROM local_message WHERE topic = 'a' ORDER BY id LIMIT 3)"
    )
    conn.execute(
        "UPDATE local_message SET status = 'CONFIRMED', delivered_at = now() - interval '1h'"
        " WHERE id = (SELECT max(id) FROM local_message WHERE topic = 'a')"
    )
    conn.commit()
    env = {"OUTBOX_DSN": dsn}
    result = cli("status", "--watch", "1", "--count", "2", "--json", env=env)
    assert result.exit_code == 0, result.output
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == 2  # one JSON document per refresh, one per line
    for report in reports:
        assert report["rate_window_seconds"] == 1
        assert report["topics"]["a"]["delivered_per_second"] == 3.0
        assert report["topics"]["b"]["delivered_per_second"] == 0
    once = json.loads(cli("status", "--json", env=env).stdout)
    assert once["topics"]["a"]["delivered_per_second"] == 3 / 60
    text = cli("status", "--watch", "1", "--count", "1", env=env).output
    assert "3.0/s" in text
    # --fail-if-* apply to the last refresh, as without --watch: 2 rows of b wait, lag > 0.
    lagging = cli("status", "--watch", "1", "--count", "1", "--fail-if-lag", "0", env=env)
    assert lagging.exit_code == 1 and "PROBLEM: lag" in lagging.output
    assert cli("status", "--watch", "0.5", env=env).exit_code == 2


def test_expected_failures_are_one_line_without_traceback_or_password(empty_dsn):
    bad = "postgresql://outbox:wr0ngpass@127.0.0.1:1/none"
    for args in (["status"], ["list"], ["migrate"], ["show", "1"], ["replay", "1", "--yes"]):
        r = run(*args, env={"OUTBOX_DSN": bad})
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("error: cannot connect to postgresql://outbox:***@127.0.0.1:1")
        assert "Traceback" not in r.stderr and "wr0ngpass" not in r.stderr + r.stdout
        assert len(r.stderr.strip().splitlines()) == 1
    # DSNs that can never connect: a usage error naming the DSN (password masked), no
    # traceback, from every command that takes one (the relay does not retry them).
    commands = (
        ["status"],
        ["list"],
        ["show", "1"],
        ["migrate"],
        ["replay", "1", "--yes"],
        ["skip", "1", "--yes"],
        ["purge", "--older-than", "1d", "--yes"],
        ["inbox", "purge", "--older-than", "1d", "--yes"],
        ["audit"],
        ["doctor"],
        ["relay", "-b", "127.0.0.1:1"],
    )
    for dsn in (
        "postgresql://outbox:wr0ngpass@127.0.0.1:70000/app",
        "password=wr0ngpass bogus",
        # A password with spaces, unquoted: libpq's message would quote its second word.
        "password=wr0ngpass horse battery dbname=x",
    ):
        for args in commands:
            r = run(*args, env={"OUTBOX_DSN": dsn}, timeout=30)
            assert r.returncode == 2, (args, dsn, r.stderr)
            out = r.stderr + r.stdout
            assert "Traceback" not in out and "wr0ngpass" not in out and "horse" not in out
            assert r.stderr.startswith("error: ") and "dsn" in r.stderr, (args, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    missing = run("status", env={"OUTBOX_DSN": empty_dsn})
    assert missing.returncode == 1 and "run `outbox migrate`" in missing.stderr
    assert run("show", "not-an-id", env={"OUTBOX_DSN": empty_dsn}).returncode == 2
    for args in commands:
        unset = run(*args, env={"OUTBOX_DSN": ""}, timeout=30)
        assert unset.returncode == 2 and "no database: set --dsn or OUTBOX_DSN" in unset.stderr


def test_usage_errors_exit_2_with_one_line(dsn):
    """What the operator typed cannot work: exit 2 (as `outbox --help` says), one line, before
    anything is touched."""
    env = {"OUTBOX_DSN": dsn}
    for args in (
        ["status", "--schema", "1bad"],
        ["list", "--schema", "bad name"],
        ["migrate", "--kafka", "--shards", "3"],
        ["doctor", "--delivery", "exactly-once", "--shards", "0"],
        ["relay", "-b", "127.0.0.1:1", "--shards", "3", "--delivery", "exactly-once"],
        ["relay", "-b", "127.0.0.1:1", "--batch-size", "0"],
        ["relay", "-b", "127.0.0.1:1", "-X", "novalue"],
        ["purge", "--older-than", "soon", "--yes"],
        ["inbox", "purge", "--older-than", "soon", "--yes"],
        ["replay", "--status", "LOST", "--yes"],
        ["list", "--since", "yesterday"],
        ["list", "--key-hex", "zz"],
        ["show", "abc"],
        ["audit", "--limit", "0"],
    ):
        result = cli(*args, env=env)
        assert result.exit_code == 2, (args, result.output)
        # One error line (after click's two-line usage hint for errors it finds itself).
        errors = [line for line in result.output.splitlines() if "rror" in line]
        assert len(errors) == 1 and "Traceback" not in result.output, (args, result.output)


def test_migrate_then_doctor(empty_dsn, bootstrap):
    env = {"OUTBOX_DSN": empty_dsn}
    before = run("doctor", "-b", bootstrap, env=env)
    assert before.returncode == 1 and "FAIL] schema: no outbox tables" in before.stdout
    assert "-> run: outbox migrate --schema public" in before.stdout
    assert (
        run("migrate", env=env).stdout.strip()
        == f"outbox schema public: version {outbox.SCHEMA_VERSION} (was absent)"
    )
    assert "already up to date" in run("migrate", env=env).stdout
    with psycopg.connect(empty_dsn) as c:
        c.execute("INSERT INTO local_message (topic, payload) VALUES ('no.such.topic', 'x')")
    after = run("doctor", "-b", bootstrap, "--json", env=env)
    findings = {f["check"]: f for f in json.loads(after.stdout)}
    assert (
        findings["topics"]["level"] == "fail" and "no.such.topic" in findings["topics"]["message"]
    )
    assert findings["relays"]["level"] == "fail"
    assert findings["indexes"]["level"] == "ok" and findings["kafka"]["level"] == "ok"
    down = run("doctor", "-b", "127.0.0.1:1", env=env, timeout=90)
    assert "FAIL] kafka: not reachable" in down.stdout


def test_show_json_gives_the_payload_as_json_text_or_base64(conn, dsn):
    with conn.transaction():
        as_json = outbox.publish(conn, topic="t", key="k", payload={"amount": 10}).id
        as_text = outbox.publish(conn, topic="t", key="k", payload=b"plain text").id
        as_bytes = outbox.publish(conn, topic="t", key="k", payload=b"\xff\x00\x01").id
    env = {"OUTBOX_DSN": dsn}

    def shown(row_id):
        out = json.loads(cli("show", str(row_id), "--json", env=env).stdout)
        return out["payload"], out["payload_encoding"]

    assert shown(as_json) == ({"amount": 10}, "json")
    assert shown(as_text) == ("plain text", "text")
    assert shown(as_bytes) == ("/wAB", "base64")
    # JSON that Python would not read back exactly is shown as its text, not changed.
    with conn.transaction():
        amount = outbox.publish(
            conn, topic="t", key="k", payload=b'{"amount": 12345678901234567.89, "fee": 1.10}'
        ).id
        twice = outbox.publish(conn, topic="t", key="k", payload=b'{"a": 1, "a": 2}').id
        fine = outbox.publish(conn, topic="t", key="k", payload=b'{"fee": 1.1}').id
    assert shown(amount) == ('{"amount": 12345678901234567.89, "fee": 1.10}', "text")
    assert shown(twice) == ('{"a": 1, "a": 2}', "text")
    assert shown(fine) == ({"fee": 1.1}, "json")


def test_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"outbox-relay {version('outbox-relay')}\n" != "outbox-relay \n"


def test_every_command_has_help_with_examples():
    for command in main.commands:
        result = cli(command, "--help")
        assert result.exit_code == 0 and "Examples:" in result.output, command


def test_metrics_port_in_use_is_one_line_and_exit_2(dsn, bootstrap):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "relay",
            "--dsn",
            dsn,
            "-b",
            bootstrap,
            "--metrics-port",
            str(port),
            "--name",
            "port-test",
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: invalid configuration: metrics_port: cannot serve on 127.0.0.1:{port} "
        "(Address already in use)"
    )
    assert "Traceback" not in result.stderr


def test_operators_see_and_select_each_tenants_rows(dsn):
    """status and the relay's gauges show each tenant's backlog; list, replay, skip and purge
    take --tenant ('' or - for the rows without one); a bad tenant name is a usage error."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        for tenant in ("acme", "globex", None):
            for n in range(3):
                outbox.publish(conn, topic="t", key=f"k{n}", payload={"n": n}, tenant=tenant)
    with psycopg.connect(dsn) as c:
        c.execute("UPDATE local_message SET status = 'FAILED' WHERE key = 'k0'")
        c.execute(
            "UPDATE local_message SET status = 'CONFIRMED', created_at = now() - interval '2d' "
            "WHERE key = 'k2'"
        )
    env = {"OUTBOX_DSN": dsn}

    report = json.loads(run("status", "--json", env=env).stdout)
    assert set(report["tenants"]) == {"acme", "globex", ""}
    acme = report["tenants"]["acme"]
    assert acme["counts"] == {"CONFIRMED": 1, "FAILED": 1, "PENDING": 1}
    assert acme["pending"] == 1 and acme["held"] == 0 and acme["lag_seconds"] is not None
    assert {(b["tenant"], b["key"]) for b in report["blocked_keys"]} == {
        ("acme", "k0"),
        ("globex", "k0"),
        ("", "k0"),
    }
    text = run("status", env=env).stdout
    assert "tenant acme: CONFIRMED 1, FAILED 1, PENDING 1" in text
    assert "tenant (none):" in text and "key k0 (tenant acme): FAILED row" in text

    listed = json.loads(run("list", "--tenant", "acme", "--json", env=env).stdout)
    assert [r["tenant"] for r in listed] == ["acme"] * 3
    none = json.loads(run("list", "--tenant", "-", "--json", env=env).stdout)
    assert [r["tenant"] for r in none] == [""] * 3
    assert run("list", "--tenant", "initech", env=env).returncode == 1
    bad = run("list", "--tenant", "no spaces", env=env)
    assert bad.returncode == 2 and "invalid tenant" in bad.stderr

    replayed = run("replay", "--tenant", "globex", "--status", "FAILED", "--yes", env=env)
    assert replayed.returncode == 0, replayed.stderr
    skipped = run("skip", "--tenant", "", "--status", "FAILED", "--yes", env=env)
    assert skipped.returncode == 0, skipped.stderr
    purged = run("purge", "--older-than", "1d", "--tenant", "acme", "--yes", env=env)
    assert purged.returncode == 0 and "purge: 1 rows deleted" in purged.stdout
    with psycopg.connect(dsn) as c:
        rows = c.execute(
            "SELECT tenant, key, status FROM local_message WHERE key IN ('k0', 'k2') "
            "ORDER BY tenant, key"
        ).fetchall()
        audit = c.execute(
            "SELECT action, selection FROM local_message_audit ORDER BY id"
        ).fetchall()
    assert rows == [
        ("", b"k0", "SKIPPED"),
        ("", b"k2", "CONFIRMED"),
        ("acme", b"k0", "FAILED"),
        ("globex", b"k0", "PENDING"),
        ("globex", b"k2", "CONFIRMED"),
    ]
    assert [(a, s.get("tenant")) for a, s in audit] == [
        ("replay", "globex"),
        ("skip", ""),
        ("purge", "acme"),
    ]


def test_the_relays_gauges_show_each_tenants_backlog(dsn):
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish_many(
            conn, [dict(topic="t", key=f"k{n}", payload={}, tenant="acme") for n in range(4)]
        )
        outbox.publish(conn, topic="t", payload={})
    store, reader = PostgresStore(dsn), PostgresStore(dsn)
    relay = Relay(store, RecordingSink(), reader=reader, name="gauges")
    try:
        relay.heartbeat_if_due()
        samples = {
            (s.name, s.labels.get("tenant")): s.value
            for metric in relay.metrics.registry.collect()
            for s in metric.samples
        }
    finally:
        store.close()
        reader.close()
    assert samples[("outbox_tenant_pending_messages", "acme")] == 4
    assert samples[("outbox_tenant_held_messages", "acme")] == 0
    assert samples[("outbox_tenant_lag_seconds", "acme")] > 0
    assert ("outbox_tenant_pending_messages", "") not in samples  # rows without a tenant
    assert samples[("outbox_pending_messages", None)] == 5
