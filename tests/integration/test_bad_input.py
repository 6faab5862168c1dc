"""The bad-input battery: every case gets a clear error, and nothing is lost for the other
messages."""

import os
import subprocess
import sys
import urllib.request

import psycopg
import pytest

import outbox
from tests.integration.test_relay_kafka import drain
from tests.kafka_helpers import read_all
from tests.relay_process import RelayProcess, all_confirmed, wait_for
from tests.verify import verify


def test_nul_and_non_utf8_bytes_and_sql_looking_strings_arrive_exactly(dsn, bootstrap, topic):
    odd = [
        (b"\x00key\xff", b"\x00\x01\xfe\xff payload"),
        ("k'; DROP TABLE local_message; --", "'); DELETE FROM local_message; --"),
        ("ключ-🔑", {"text": "NUL-free but odd: \u2028 \\ \" '", "n": 1}),
    ]
    headers = {"x-sql": "' OR 1=1 --", "x-bin": b"\x00\xff", "x-empty": b""}
    with psycopg.connect(dsn) as conn, conn.transaction():
        for key, payload in odd:
            outbox.publish(conn, topic=topic, key=key, payload=payload, headers=headers)
    drain(dsn, bootstrap)
    got = sorted(read_all(bootstrap, topic, expected=3), key=lambda m: m.header("message_id"))
    with psycopg.connect(dsn) as c:
        rows = c.execute("SELECT message_id::text, key, payload FROM local_message").fetchall()
    by_mid = {m.header("message_id").decode(): m for m in got}
    for mid, key, payload in rows:
        assert by_mid[mid].key == key and by_mid[mid].value == payload
        assert by_mid[mid].header("x-sql") == b"' OR 1=1 --"
        assert by_mid[mid].header("x-bin") == b"\x00\xff"
        assert by_mid[mid].header("x-empty") == b""
    with psycopg.connect(dsn) as c:
        assert c.execute(
            "SELECT count(*) FROM local_message WHERE status = 'CONFIRMED'"
        ).fetchone() == (3,)


@pytest.mark.parametrize("topic_name", ["bad; DROP TABLE local_message", "a b", "", "x" * 250])
def test_sql_looking_or_invalid_topic_is_refused_at_write_time(conn, topic_name):
    with conn.transaction():
        outbox.publish(conn, topic="fine", payload={})
        with pytest.raises(outbox.InvalidTopic):
            outbox.publish(conn, topic=topic_name, payload={})
    assert conn.execute("SELECT topic FROM local_message").fetchall() == [("fine",)]


def relay_once(dsn, bootstrap, **env):
    return subprocess.run(
        [sys.executable, "-m", "relay", "relay", "--once", "--no-listen"],
        env={**os.environ, "OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_relay_refuses_a_missing_or_older_schema_with_what_to_do(empty_dsn, dsn, bootstrap):
    missing = relay_once(empty_dsn, bootstrap)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].endswith("run `outbox migrate`")
    assert "Traceback" not in missing.stderr
    with psycopg.connect(dsn) as c:
        c.execute("DELETE FROM local_message_schema WHERE version > 1")
    older = relay_once(dsn, bootstrap)
    assert older.returncode == 1
    assert (
        f"outbox schema version 1 in 'public', this code needs {outbox.SCHEMA_VERSION}: "
        "run `outbox migrate`"
    ) in older.stderr


def test_wrong_dsn_fails_at_start_in_one_line_without_the_password(dsn, bootstrap):
    port = psycopg.conninfo.conninfo_to_dict(dsn)["port"]  # the test server: a wrong password
    result = relay_once(f"postgresql://outbox:not-the-pw-93@127.0.0.1:{port}/outbox", bootstrap)
    assert result.returncode == 1
    assert "not-the-pw-93" not in result.stderr + result.stdout
    assert (
        f"error: cannot connect to postgresql://outbox:***@127.0.0.1:{port}/outbox" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_table_locked_by_a_long_transaction_stalls_nothing_else(dsn, bootstrap, topic, tmp_path):
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish_many(conn, [dict(topic=topic, key="k", payload={"i": i}) for i in range(5)])
    locker = psycopg.connect(dsn)
    locker.execute("LOCK TABLE local_message IN ACCESS EXCLUSIVE MODE")
    relay = RelayProcess("locked", dsn, bootstrap, tmp_path)
    try:
        wait_for(lambda: "lock timeout" in relay.log(), 60, "the relay's lock timeout")
        assert relay.alive(), "the relay survives a locked table"
        locker.rollback()
        wait_for(lambda: all_confirmed(dsn, 5), 60, "delivery once the lock is gone")
        assert relay.stop() == 0
    finally:
        locker.close()
        if relay.alive():
            relay.kill()
    verify(dsn, bootstrap, topic).assert_clean()


def test_unreachable_bootstrap_server_burns_no_attempts(dsn, tmp_path):
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic="t", key="k", payload={})
    relay = RelayProcess("nowhere", dsn, "127.0.0.1:1", tmp_path)
    try:
        wait_for(lambda: "Kafka unreachable: pausing" in relay.log(), 60, "the circuit breaker")
        assert relay.stop() == 0
    finally:
        if relay.alive():
            relay.kill()
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT status, attempts, last_error FROM local_message").fetchone() == (
            "PENDING",
            0,
            None,
        )


def test_an_outage_is_logged_once_per_problem_not_once_per_retry(dsn, tmp_path):
    """librdkafka reports a refused connection every few hundred ms, and the relay fails batch
    after batch: each distinct problem is logged once (then a summary once a minute)."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic="t", key="k", payload={})
    relay = RelayProcess("quiet", dsn, "127.0.0.1:1", tmp_path, OUTBOX_METRICS_PORT="19494")

    def metric(name: str) -> float:
        try:
            body = (
                urllib.request.urlopen("http://127.0.0.1:19494/metrics", timeout=5).read().decode()
            )
        except OSError:  # not serving yet
            return float("nan")
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name)
        )

    try:
        wait_for(
            lambda: metric("outbox_delivery_failures_total") >= 4,
            90,
            "four batches failed for the outage",
        )
        assert metric("outbox_kafka_up") == 0.0
        lines = relay.log().splitlines()
        assert relay.stop() == 0
    finally:
        if relay.alive():
            relay.kill()
    assert sum("Connect to" in line for line in lines) <= 2, "\n".join(lines)
    assert sum("Kafka unreachable: pausing" in line for line in lines) == 1
    assert sum("topic metadata" in line for line in lines) <= 2
    assert len(lines) < 25, "\n".join(lines)
