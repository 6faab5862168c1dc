"""Dead-letter topic, NOTIFY wake-ups and retention, with the real pair."""

import json
import threading
import time

import psycopg

import outbox
from relay.runner import build_relay, run_relay
from tests.integration.test_relay_kafka import drain, relay_config
from tests.kafka_helpers import create_topic, delete_topic, read_all
from tests.relay_process import wait_for


def test_rows_that_fail_for_good_are_copied_to_the_dead_letter_topic(dsn, bootstrap, topic):
    dlq = topic + ".dlq"
    create_topic(bootstrap, dlq, partitions=1)
    try:
        with psycopg.connect(dsn) as conn, conn.transaction():
            p = outbox.publish(
                conn, topic=topic + ".missing", key="k", payload={"n": 1}, headers={"trace": "abc"}
            )
        drain(dsn, bootstrap, max_attempts=1, dead_letter_topic=dlq)
        (copy,) = read_all(bootstrap, dlq, expected=1)
        assert json.loads(copy.value) == {"n": 1} and copy.key == b"k"
        assert copy.header("message_id") == str(p.message_id).encode()
        assert copy.header("trace") == b"abc"
        assert copy.header("outbox_original_topic") == (topic + ".missing").encode()
        assert b"UNKNOWN_TOPIC" in copy.header("outbox_error")
        assert copy.header("outbox_row_id") == str(p.id).encode()
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT status FROM local_message").fetchone() == ("FAILED",)
    finally:
        delete_topic(bootstrap, dlq)


def test_notify_wakes_an_idle_relay_long_before_its_next_poll(dsn, bootstrap, topic):
    cfg = relay_config(dsn, bootstrap, idle_poll_min=20.0, idle_poll_interval=20.0)
    cfg.listen = True
    relay, listener = build_relay(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    born = relay.last_progress
    thread.start()
    try:
        # Its first poll found nothing: from now on it waits 20 s, unless NOTIFY wakes it.
        wait_for(lambda: relay.last_progress > born, 30, "the relay's first poll")
        started = time.monotonic()
        with psycopg.connect(dsn) as conn, conn.transaction():
            outbox.publish(conn, topic=topic, key="k", payload={"n": 1})
        with psycopg.connect(dsn) as c:
            wait_for(
                lambda: c.execute("SELECT status FROM local_message").fetchone() == ("CONFIRMED",),
                15,
                "delivery after NOTIFY",
            )
        assert time.monotonic() - started < 10, "woken by NOTIFY, not by the 20 s poll"
    finally:
        stop.set()
        thread.join(60)
        relay.sink.close(5)
        relay.close_stores()
        listener.close()
    assert not thread.is_alive()
    assert time.monotonic() - started < 15, "the stop event ends the 20 s idle wait"


def test_relay_retention_deletes_old_confirmed_rows_only(dsn, bootstrap):
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            outbox.publish_many(conn, [dict(topic="t", payload={})] * 2500)
        conn.execute(
            "UPDATE local_message SET created_at = now() - interval '2 days', "
            "status = CASE WHEN id % 2 = 0 THEN 'CONFIRMED' ELSE 'FAILED' END"
        )
        conn.execute(
            "INSERT INTO local_message (topic, payload, status) VALUES ('t', 'x', 'CONFIRMED')"
        )
        conn.commit()
    # As `outbox relay --once --retention 1d` runs it: the relay, then a round of retention
    # on its own connection (relay.retention).
    assert (
        run_relay(
            relay_config(dsn, bootstrap, retention_seconds=86400.0),
            threading.Event(),
            until_idle=True,
        )
        == 0
    )
    with psycopg.connect(dsn) as c:
        left = dict(c.execute("SELECT status, count(*) FROM local_message GROUP BY 1").fetchall())
    assert left == {"FAILED": 1250, "CONFIRMED": 1}
