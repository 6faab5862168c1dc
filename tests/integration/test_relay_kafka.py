"""The walking skeleton against the real pair: commit -> in Kafka and CONFIRMED; rollback ->
nothing anywhere; the `outbox relay` process drains and stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg

import outbox
from relay.config import RelayConfig
from relay.runner import run_relay
from tests.kafka_helpers import read_all


def relay_config(dsn, bootstrap, **kw):
    return RelayConfig.from_env(
        {},
        dsn=dsn,
        bootstrap_servers=bootstrap,
        flush_timeout=15.0,
        lease_seconds=40.0,
        heartbeat_interval=5.0,
        listen=False,
        **kw,
    )


def drain(dsn, bootstrap, timeout=60.0, **kw):
    """Run the relay until nothing is deliverable (or TIMEOUT, a failure)."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        assert run_relay(relay_config(dsn, bootstrap, **kw), stop, until_idle=True) == 0
    finally:
        timer.cancel()
    assert not stop.is_set(), f"the relay was still busy after {timeout}s"


def statuses(dsn):
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT id, status, kafka_partition, kafka_offset, attempts, last_error "
            "FROM local_message ORDER BY id"
        ).fetchall()


def test_committed_event_reaches_kafka_intact_and_is_confirmed(conn, dsn, bootstrap, topic):
    with conn.transaction():
        conn.execute("CREATE TABLE account (id int PRIMARY KEY, balance int)")
        conn.execute("INSERT INTO account VALUES (1, 90)")
        p = outbox.publish(
            conn,
            topic=topic,
            key="acct-1",
            payload={"balance": 90},
            headers={"event-type": "AccountDebited", "bin": b"\x00\xfe"},
        )
    drain(dsn, bootstrap)

    (msg,) = read_all(bootstrap, topic, expected=1)
    assert msg.key == b"acct-1"
    assert json.loads(msg.value) == {"balance": 90}
    assert msg.header("message_id") == str(p.message_id).encode()
    assert msg.header("event-type") == b"AccountDebited"
    assert msg.header("bin") == b"\x00\xfe"
    ((row_id, status, partition, offset, attempts, error),) = statuses(dsn)
    assert (row_id, status, attempts, error) == (p.id, "CONFIRMED", 0, None)
    assert (partition, offset) == (msg.partition, msg.offset)


def test_rolled_back_event_is_neither_stored_nor_sent(conn, dsn, bootstrap, topic):
    outbox.publish(conn, topic=topic, key="k", payload={"never": True})
    conn.rollback()
    with conn.transaction():
        outbox.publish(conn, topic=topic, key="k", payload={"committed": True})
    drain(dsn, bootstrap)
    received = read_all(bootstrap, topic, expected=1)
    assert [json.loads(m.value) for m in received] == [{"committed": True}]
    assert [s[1] for s in statuses(dsn)] == ["CONFIRMED"]


def test_per_key_order_over_several_partitions_and_batches(conn, dsn, bootstrap, topic):
    with conn.transaction():
        outbox.publish_many(
            conn, [dict(topic=topic, key=f"k{i % 20}", payload={"i": i}) for i in range(3000)]
        )
    drain(dsn, bootstrap, batch_size=500)
    received = read_all(bootstrap, topic, expected=3000)
    assert len(received) == 3000
    by_key = {}
    for m in sorted(received, key=lambda m: (m.partition, m.offset)):
        by_key.setdefault(m.key, []).append(json.loads(m.value)["i"])
    for key, seq in by_key.items():
        assert seq == sorted(seq), f"order broken for {key!r}"
    assert {s[1] for s in statuses(dsn)} == {"CONFIRMED"}


def test_missing_topic_is_a_recorded_error_that_holds_its_key_only(conn, dsn, bootstrap, topic):
    missing = topic + ".missing"
    with conn.transaction():
        outbox.publish(conn, topic=missing, key="K", payload={"n": 1})
        outbox.publish(conn, topic=topic, key="K", payload={"n": 2})
        outbox.publish(conn, topic=topic, key="other", payload={"n": 3})
    drain(dsn, bootstrap)
    rows = statuses(dsn)
    assert rows[0][1] == "PENDING" and rows[0][4] == 1
    assert "UNKNOWN_TOPIC" in rows[0][5] and missing in rows[0][5]
    assert rows[1][1] == "PENDING", "a later row of the key must wait behind the failed one"
    assert rows[2][1] == "CONFIRMED"
    assert [json.loads(m.value) for m in read_all(bootstrap, topic, expected=1)] == [{"n": 3}]


def test_outbox_relay_process_delivers_and_stops_on_sigterm(conn, dsn, bootstrap, topic):
    with conn.transaction():
        outbox.publish_many(
            conn, [dict(topic=topic, key="k", payload={"i": i}) for i in range(100)]
        )
    env = {
        **os.environ,
        "OUTBOX_DSN": dsn,
        "OUTBOX_BOOTSTRAP_SERVERS": bootstrap,
        "OUTBOX_FLUSH_TIMEOUT": "15",
        "OUTBOX_LEASE_SECONDS": "40",
        "OUTBOX_HEARTBEAT_INTERVAL": "5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "relay", "--name", "e2e"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(s[1] == "CONFIRMED" for s in statuses(dsn)):
                break
            time.sleep(0.1)
        assert all(s[1] == "CONFIRMED" for s in statuses(dsn))
        with conn.transaction():
            outbox.publish(conn, topic=topic, key="k", payload={"i": 100})
        while time.monotonic() < deadline and statuses(dsn)[-1][1] != "CONFIRMED":
            time.sleep(0.05)
        assert statuses(dsn)[-1][1] == "CONFIRMED", "the running relay picks up new rows"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "draining and stopping" in out and "101 delivered" in out
    assert len(read_all(bootstrap, topic, expected=101)) == 101
    with psycopg.connect(dsn) as c:
        assert c.execute(
            "SELECT count(*) FROM local_message_bucket WHERE owner IS NOT NULL"
        ).fetchone() == (0,), "leases released on shutdown"
