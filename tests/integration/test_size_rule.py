"""One size rule: what publish() accepts, the relay delivers; one byte more is refused at write
time; `outbox doctor` says which topics could not take a record at the limit."""

import os
import uuid

import psycopg
import pytest

import outbox
from outbox.message import DEFAULT_MAX_MESSAGE_BYTES, record_size
from relay.doctor import run_checks
from tests.integration.test_relay_kafka import drain
from tests.kafka_helpers import create_topic, delete_topic, read_all


def payload_of_record_size(size: int, key: bytes, headers) -> bytes:
    # Random bytes: lz4 cannot shrink them, so the broker sees the full size.
    payload = os.urandom(size - record_size(key, b"", headers))
    assert record_size(key, payload, headers) == size
    return payload


def test_a_record_at_the_limit_is_delivered_and_one_byte_more_is_refused(dsn, bootstrap, topic):
    headers = [("event-type", b"Big")]
    exact = payload_of_record_size(DEFAULT_MAX_MESSAGE_BYTES, b"edge", headers)
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            outbox.publish(
                conn, topic=topic, key="edge", payload=exact, headers={"event-type": "Big"}
            )
        with pytest.raises(outbox.MessageTooLarge, match="above the maximum of 1000000 bytes"):
            with conn.transaction():
                outbox.publish(
                    conn,
                    topic=topic,
                    key="edge",
                    payload=exact + b"!",
                    headers={"event-type": "Big"},
                )
        assert conn.execute("SELECT count(*) FROM local_message").fetchone() == (1,)
    drain(dsn, bootstrap)
    (got,) = read_all(bootstrap, topic, expected=1)
    assert got.value == exact and got.key == b"edge"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT status, attempts FROM local_message").fetchone() == (
            "CONFIRMED",
            0,
        )


def test_doctor_warns_about_a_topic_too_small_for_the_limit(dsn, bootstrap):
    small = f"t.small.{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, small, partitions=1, config={"max.message.bytes": "500000"})
    try:
        with psycopg.connect(dsn) as conn, conn.transaction():
            outbox.publish(conn, topic=small, key="k", payload={"n": 1})
        findings = {
            f.check: f
            for f in run_checks(
                dsn, "public", {"bootstrap.servers": bootstrap}, DEFAULT_MAX_MESSAGE_BYTES
            )
        }
        size = findings["message size"]
        assert size.level == "warn" and f"{small} (500000)" in size.message
        ok = {
            f.check: f for f in run_checks(dsn, "public", {"bootstrap.servers": bootstrap}, 400_000)
        }
        assert ok["message size"].level == "ok"
    finally:
        delete_topic(bootstrap, small)
