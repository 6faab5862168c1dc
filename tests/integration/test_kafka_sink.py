"""KafkaSink against the real broker: reports, headers, fatal errors."""

import datetime as dt
import os
import uuid

from relay.kafka import KafkaSink
from relay.model import Delivered, Failed, FailureKind, PendingMessage
from tests.kafka_helpers import create_topic, delete_topic, read_all


def message(i, topic, key=b"k"):
    return PendingMessage(
        i,
        uuid.uuid4(),
        topic,
        key,
        b'{"i":%d}' % i,
        [("h", b"v")],
        0,
        dt.datetime.now(dt.timezone.utc),
    )


def test_fatal_producer_error_replaces_the_producer_and_nothing_is_lost(bootstrap):
    """A real fatal error: the broker rejects a request for good, and the gapless guarantee
    stops the producer. The producer is replaced, the messages without a report come back
    UNKNOWN (not counted), and sent again they arrive."""
    topic = f"t.fatal.{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, partitions=1, config={"max.message.bytes": "3000"})
    # Topic limits not read, as if DescribeConfigs were not allowed: the big message below is
    # not known to be too large, so it is not sent alone.
    sink = KafkaSink(
        {"bootstrap.servers": bootstrap, "batch.num.messages": "1"},
        flush_timeout=15,
        read_topic_limits=False,
    )
    try:
        first = sink.send([message(1, topic)])
        assert isinstance(first[0], Delivered)
        old = sink.producer
        # lz4 cannot shrink it
        big = message(2, topic, key=b"other")._replace(payload=os.urandom(5000))
        outcomes = sink.send([big] + [message(i, topic, key=b"k%d" % i) for i in range(3, 8)])
        assert sink.resets == 1 and sink.producer is not old
        assert outcomes[0].kind is FailureKind.ISOLATE  # rejected, not yet known to be alone
        for o in outcomes[1:]:
            assert isinstance(o, Delivered) or o.kind in (FailureKind.UNKNOWN, FailureKind.OUTAGE)
        retry = [
            message(o.id, topic, key=b"k%d" % o.id) for o in outcomes[1:] if isinstance(o, Failed)
        ]
        again = sink.send(retry) if retry else []
        assert all(isinstance(o, Delivered) for o in again)
        got = {m.value for m in read_all(bootstrap, topic, expected=6)}
        assert got == {b'{"i":%d}' % i for i in (1, 3, 4, 5, 6, 7)}
    finally:
        sink.close(5)
        delete_topic(bootstrap, topic)


def test_every_message_carries_its_message_id_and_headers(bootstrap, topic):
    sink = KafkaSink({"bootstrap.servers": bootstrap})
    try:
        m = message(7, topic, key=None)
        (outcome,) = sink.send([m])
        assert isinstance(outcome, Delivered)
        (got,) = read_all(bootstrap, topic, expected=1)
        assert got.headers == [("message_id", str(m.message_id).encode()), ("h", b"v")]
        assert got.key is None and (got.partition, got.offset) == (
            outcome.partition,
            outcome.offset,
        )
    finally:
        sink.close(5)


def test_unreachable_broker_is_an_outage_not_a_message_failure():
    sink = KafkaSink({"bootstrap.servers": "127.0.0.1:1"}, flush_timeout=3, metadata_timeout=1)
    try:
        outcomes = sink.send([message(1, "any.topic")])
        assert isinstance(outcomes[0], Failed)
        assert outcomes[0].kind in (FailureKind.OUTAGE, FailureKind.UNKNOWN)
    finally:
        sink.close(0)


def test_full_producer_queue_is_served_and_retried(bootstrap, topic):
    sink = KafkaSink(
        {"bootstrap.servers": bootstrap, "queue.buffering.max.messages": "10", "linger.ms": "50"}
    )
    try:
        outcomes = sink.send([message(i, topic, key=b"k%d" % (i % 3)) for i in range(200)])
        assert all(isinstance(o, Delivered) for o in outcomes)
        assert len(read_all(bootstrap, topic, expected=200)) == 200
    finally:
        sink.close(5)
