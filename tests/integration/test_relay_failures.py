"""Message-specific failures against the real broker: a message too large for its topic fails
alone, holds its key, and costs no other message an attempt."""

import json
import os
import time

import psycopg

import outbox
from relay.runner import build_relay
from tests.integration.test_relay_kafka import relay_config, statuses
from tests.kafka_helpers import create_topic, delete_topic, read_all


def run_until(relay, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        relay.run_once()
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_too_large_for_its_topic_fails_alone_holds_its_key_and_others_flow(dsn, bootstrap):
    topic = f"t.small.{os.getpid()}.{time.monotonic_ns()}"
    create_topic(bootstrap, topic, partitions=1, config={"max.message.bytes": "3000"})
    try:
        with psycopg.connect(dsn) as conn, conn.transaction():
            first = outbox.publish(conn, topic=topic, key="K", payload={"n": 1})
            big = outbox.publish(conn, topic=topic, key="K", payload=os.urandom(5000))
            held = outbox.publish(conn, topic=topic, key="K", payload={"n": 3})
            other = outbox.publish(conn, topic=topic, key="other", payload={"n": 4})
        relay, _ = build_relay(relay_config(dsn, bootstrap, max_attempts=2, backoff_base=0.05))
        try:
            rows = lambda: {r[0]: r for r in statuses(dsn)}  # noqa: E731
            # A rejection stops the producer (gapless guarantee); the messages after it in the
            # batch are sent again by the next one.
            run_until(
                relay, lambda: rows()[big.id][1] == "FAILED" and rows()[other.id][1] == "CONFIRMED"
            )
            final = rows()
        finally:
            relay.shutdown()
            relay.sink.close(5)
            relay.close_stores()
        assert final[first.id][1] == "CONFIRMED" and final[other.id][1] == "CONFIRMED"
        assert final[big.id][4] == 2 and "MSG_SIZE_TOO_LARGE" in final[big.id][5]
        assert final[held.id][1] == "PENDING" and final[held.id][4] == 0
        assert final[first.id][4] == final[other.id][4] == 0
        got = [json.loads(m.value) for m in read_all(bootstrap, topic, expected=2)]
        assert got == [{"n": 1}, {"n": 4}]
        assert relay.stats["order_inversions"] == 0
    finally:
        delete_topic(bootstrap, topic)


def test_a_missing_topic_makes_its_row_failed_after_a_few_attempts_not_twelve(
    dsn, bootstrap, caplog
):
    """With auto-creation off, a row for a topic that does not exist cannot succeed until
    someone creates it: after max_permanent_attempts (3 by default, not max_attempts' 12 with
    backoff up to minutes) it is FAILED, and its key shows as blocked. The log calls it FAILED
    only then; before, each line says which attempt it was."""
    topic = f"t.missing.{os.getpid()}.{time.monotonic_ns()}"
    with psycopg.connect(dsn) as conn, conn.transaction():
        lost = outbox.publish(conn, topic=topic, key="K", payload={"n": 1})
    relay, _ = build_relay(relay_config(dsn, bootstrap, backoff_base=0.05, backoff_max=0.2))
    assert relay.retry.max_attempts == 12
    try:
        run_until(relay, lambda: {r[0]: r for r in statuses(dsn)}[lost.id][1] == "FAILED")
    finally:
        relay.shutdown()
        relay.sink.close(5)
        relay.close_stores()
    row = {r[0]: r for r in statuses(dsn)}[lost.id]
    assert row[4] == 3 and "UNKNOWN_TOPIC" in row[5]
    lines = [r.getMessage() for r in caplog.records if f"row {lost.id} " in r.getMessage()]
    assert [("attempt 1 of 3" in m, "attempt 2 of 3" in m) for m in lines[:2]] == [
        (True, False),
        (False, True),
    ]
    assert lines[2].startswith(f"row {lost.id} is FAILED after 3 attempts (permanent)")
    assert not any("permanent" in m for m in lines[:2])
    assert relay.stats["failed"] == 1


def test_request_rejected_as_a_whole_costs_no_attempts_and_everything_arrives(
    dsn, bootstrap, caplog
):
    """Each message fits the topic, several together do not: the broker rejects the shared
    request, the relay sends them alone, all arrive in key order and no attempt is counted."""
    topic = f"t.pack.{os.getpid()}.{time.monotonic_ns()}"
    create_topic(bootstrap, topic, partitions=1, config={"max.message.bytes": "4000"})
    try:
        with psycopg.connect(dsn) as conn, conn.transaction():
            outbox.publish_many(
                conn,
                [dict(topic=topic, key=f"k{i % 3}", payload=os.urandom(1500)) for i in range(9)],
            )
        relay, _ = build_relay(relay_config(dsn, bootstrap))
        try:
            run_until(relay, lambda: all(r[1] == "CONFIRMED" for r in statuses(dsn)))
        finally:
            relay.shutdown()
            relay.sink.close(5)
            relay.close_stores()
        assert "postponed (isolate): MSG_SIZE_TOO_LARGE" in caplog.text, "the shared request failed"
        assert all(r[4] == 0 for r in statuses(dsn)), "no attempt counted"
        received = read_all(bootstrap, topic, expected=9)
        assert len(received) >= 9
        ids = [int(r[0]) for r in statuses(dsn)]
        assert relay.stats["order_inversions"] == 0
        with psycopg.connect(dsn) as c:
            offsets = dict(c.execute("SELECT id, kafka_offset FROM local_message").fetchall())
        for k in range(3):
            mine = [i for n, i in enumerate(ids) if n % 3 == k]
            assert [offsets[i] for i in mine] == sorted(offsets[i] for i in mine)
    finally:
        delete_topic(bootstrap, topic)
