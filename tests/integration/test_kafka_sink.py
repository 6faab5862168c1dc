"""KafkaSink against the real broker: reports, headers, fatal errors."""

import datetime as dt
import uuid

from confluent_kafka import KafkaError

from relay.kafka import KafkaSink
from relay.model import Delivered, Failed, FailureKind, PendingMessage
from tests.kafka_helpers import read_all


def message(i, topic, key=b"k"):
    return PendingMessage(i, uuid.uuid4(), topic, key, b'{"i":%d}' % i, [("h", b"v")], 0,
                          dt.datetime.now(dt.timezone.utc))


def test_fatal_producer_error_recreates_the_producer_and_nothing_is_lost(bootstrap, topic):
    sink = KafkaSink({"bootstrap.servers": bootstrap, "message.timeout.ms": "10000"},
                     flush_timeout=15)
    try:
        first = sink.send([message(1, topic)])
        assert isinstance(first[0], Delivered)
        old = sink.producer
        # librdkafka reports a fatal error (an idempotence sequence the broker refuses, say).
        sink._on_error(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
        outcomes = sink.send([message(2, topic), message(3, topic)])
        assert sink.resets == 1
        for o in outcomes:
            assert isinstance(o, Delivered) or (isinstance(o, Failed)
                                                and o.kind is FailureKind.UNKNOWN)
        retry = [message(o.id, topic) for o in outcomes if isinstance(o, Failed)]
        again = sink.send(retry) if retry else []
        assert all(isinstance(o, Delivered) for o in again)
        assert sink.producer is not old
        got = {m.value for m in read_all(bootstrap, topic, expected=3)}
        assert got >= {b'{"i":1}', b'{"i":2}', b'{"i":3}'}
    finally:
        sink.close(5)


def test_every_message_carries_its_message_id_and_headers(bootstrap, topic):
    sink = KafkaSink({"bootstrap.servers": bootstrap})
    try:
        m = message(7, topic, key=None)
        (outcome,) = sink.send([m])
        assert isinstance(outcome, Delivered)
        (got,) = read_all(bootstrap, topic, expected=1)
        assert got.headers == [("message_id", str(m.message_id).encode()), ("h", b"v")]
        assert got.key is None and (got.partition, got.offset) == (outcome.partition,
                                                                   outcome.offset)
    finally:
        sink.close(5)


def test_unreachable_broker_is_an_outage_not_a_message_failure():
    sink = KafkaSink({"bootstrap.servers": "127.0.0.1:1", "message.timeout.ms": "2000"},
                     flush_timeout=3)
    try:
        outcomes = sink.send([message(1, "any.topic")])
        assert isinstance(outcomes[0], Failed)
        assert outcomes[0].kind in (FailureKind.OUTAGE, FailureKind.UNKNOWN)
    finally:
        sink.close(0)


def test_full_producer_queue_is_served_and_retried(bootstrap, topic):
    sink = KafkaSink({"bootstrap.servers": bootstrap, "queue.buffering.max.messages": "10",
                      "linger.ms": "50"})
    try:
        outcomes = sink.send([message(i, topic, key=b"k%d" % (i % 3)) for i in range(200)])
        assert all(isinstance(o, Delivered) for o in outcomes)
        assert len(read_all(bootstrap, topic, expected=200)) == 200
    finally:
        sink.close(5)
