"""The Sink contract (relay.model.Sink), held by the Kafka sink against the real broker and by
the in-memory RecordingSink the loop's unit tests use: a test of the loop with the fake means
what it says only while both behave the same."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from relay.model import Delivered, Failed, FailureKind, PendingMessage, Sink
from relay.testing import RecordingSink

#: A topic the cluster does not have: its messages cannot be delivered. (The project's broker
#: runs with auto.create.topics.enable=false, as scripts/services starts it; a broker that
#: creates topics on demand would deliver it and fail this test.)
MISSING = "t.contract.missing"


@dataclass
class SinkUnderTest:
    sink: Sink
    topic: str
    #: The payloads that reached the other side, once COUNT of them have.
    received: Callable[[int], list[bytes]]


def _kafka(bootstrap: str) -> Iterator[SinkUnderTest]:
    from relay.kafka import KafkaSink
    from tests.kafka_helpers import create_topic, delete_topic, read_all

    topic = f"t.contract.{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, partitions=3)
    sink = KafkaSink({"bootstrap.servers": bootstrap}, flush_timeout=15)
    try:
        yield SinkUnderTest(sink, topic, lambda n: [m.value for m in read_all(bootstrap, topic, n)])
    finally:
        sink.close(5)
        delete_topic(bootstrap, topic)


def _in_memory() -> Iterator[SinkUnderTest]:
    def refuse_missing(m: PendingMessage):
        if m.topic == MISSING:
            return Failed(m.id, FailureKind.PERMANENT, "no such topic")
        return None

    sink = RecordingSink(refuse_missing)
    yield SinkUnderTest(sink, "t.contract", lambda n: [m.payload for m in sink.sent])


@pytest.fixture(params=["kafka", "in-memory"])
def under_test(request) -> Iterator[SinkUnderTest]:
    if request.param == "kafka":
        yield from _kafka(request.getfixturevalue("bootstrap"))
    else:
        yield from _in_memory()


def message(i: int, topic: str, key: bytes | None, payload: bytes | None = None) -> PendingMessage:
    return PendingMessage(
        i,
        uuid.uuid4(),
        topic,
        key,
        payload or b'{"i":%d}' % i,
        [],
        0,
        dt.datetime.now(dt.timezone.utc),
    )


def test_one_outcome_per_message_in_batch_order_and_a_key_in_offset_order(under_test):
    t = under_test
    batch = [message(i, t.topic, b"k%d" % (i % 3)) for i in range(1, 31)]
    outcomes = t.sink.send(batch)
    assert [o.id for o in outcomes] == [m.id for m in batch]
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    for key in (b"k0", b"k1", b"k2"):
        places = [
            (o.partition, o.offset) for o, m in zip(outcomes, batch, strict=True) if m.key == key
        ]
        assert len({p for p, _ in places}) == 1  # one key, one partition
        assert [off for _, off in places] == sorted(off for _, off in places)
    assert sorted(t.received(30)) == sorted(m.payload for m in batch)
    assert t.sink.resets == 0


def test_a_message_that_cannot_be_delivered_holds_back_its_key_only(under_test):
    t = under_test
    lost = message(2, MISSING, b"a")
    batch = [
        message(1, t.topic, b"a"),
        lost,
        message(3, t.topic, b"b"),
        message(4, t.topic, b"a"),
        message(5, t.topic, None),
    ]
    outcomes = {o.id: o for o in t.sink.send(batch)}
    assert isinstance(outcomes[1], Delivered)
    assert isinstance(outcomes[2], Failed) and outcomes[2].kind is FailureKind.PERMANENT
    # Key "a"'s next message is not sent behind the failure: it waits for it to be resolved.
    assert isinstance(outcomes[4], Failed) and outcomes[4].kind is FailureKind.DEFERRED
    assert isinstance(outcomes[3], Delivered) and isinstance(outcomes[5], Delivered)
    assert sorted(t.received(3)) == sorted([b'{"i":1}', b'{"i":3}', b'{"i":5}'])
