"""Per-key order through broker outages, proven by reading the topics back (tests/verify.py),
not by the relay's own counter.

The sequence that once broke order: the broker dies; one transaction commits a message of key
k1 on a topic the relay knows, a dozen on a topic it has not seen, and a second message of k1;
the broker comes back while the batch is alive. Variants: the broker back after the batch's
deadline, the relay SIGKILLed while it waits, and the earlier message rejected by the broker
(too large for a limit lowered behind the relay's back) after the later one was queued.

These tests stop, kill and pause the shared broker; each starts it again before it ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
import time
import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

import outbox
from relay import operations
from relay.config import RelayConfig
from relay.kafka import KafkaSink
from relay.model import SEND_MARGIN, Delivered, Failed, FailureKind, PendingMessage
from relay.runner import build_relay
from relay.selection import Selection
from tests.kafka_helpers import check_kafka, create_topic, delete_topic, read_all
from tests.relay_process import counts, wait_for
from tests.service_control import broker_back, broker_pid, kill_broker
from tests.verify import verify

pytestmark = pytest.mark.services


@pytest.fixture
def second_topic(bootstrap):
    name = f"u.{uuid.uuid4().hex[:12]}"
    create_topic(bootstrap, name, partitions=3)
    yield name
    delete_topic(bootstrap, name)


@pytest.fixture
def broker_restored(bootstrap):
    """Whatever the test did to the broker, it is running again afterwards."""
    yield
    try:
        os.kill(broker_pid(), signal.SIGCONT)
    except (OSError, ValueError):
        pass
    broker_back(bootstrap)


def relay_config(dsn, bootstrap, **kw) -> RelayConfig:
    values = dict(
        dsn=dsn,
        bootstrap_servers=bootstrap,
        flush_timeout=20.0,
        metadata_timeout=3.0,
        lease_seconds=40.0,
        heartbeat_interval=5.0,
        listen=False,
        backoff_base=0.1,
        backoff_max=0.5,
    )
    values.update(kw)
    return RelayConfig.from_env({}, **values)


@contextlib.contextmanager
def in_process_relay(cfg: RelayConfig):
    """A relay driven by the test (run_once), shut down and closed whatever happens."""
    relay, _ = build_relay(cfg)
    try:
        yield relay
    finally:
        relay.shutdown()
        relay.sink.close(5)
        relay.close_stores()


def warm_up(relay, dsn, topic) -> None:
    """Deliver one row of key k1 on TOPIC: the relay now has TOPIC's metadata cached."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=topic, key="k1", payload={"m": "warmup"})
    run_until_confirmed(relay, dsn, 1)


def assert_sequence_in_order(dsn, bootstrap, topic, second_topic) -> None:
    """Kafka holds k1 as warmup, a, b (first copies), and both topics verify clean."""
    assert first_copies(values_of_key(bootstrap, topic, b"k1", 3)) == [
        b'{"m":"warmup"}',
        b'{"m":"a"}',
        b'{"m":"b"}',
    ]
    for t in (topic, second_topic):
        verify(dsn, bootstrap, t).assert_clean()


def commit_the_sequence(dsn, topic, second_topic, key="k1", n_unseen=12) -> None:
    """One transaction: a (TOPIC, KEY), N_UNSEEN rows on SECOND_TOPIC, b (TOPIC, KEY)."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=topic, key=key, payload={"m": "a"})
        outbox.publish_many(
            conn, [dict(topic=second_topic, key=f"u{i}", payload={"u": i}) for i in range(n_unseen)]
        )
        outbox.publish(conn, topic=topic, key=key, payload={"m": "b"})


def run_until_confirmed(relay, dsn, total, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while counts(dsn).get("CONFIRMED", 0) < total:
        assert time.monotonic() < deadline, f"not all confirmed: {counts(dsn)}"
        if relay.run_once() == 0:
            time.sleep(0.2)  # rows in backoff: poll again shortly


def values_of_key(bootstrap, topic, key: bytes, expected: int) -> list[bytes]:
    got = read_all(bootstrap, topic, expected=expected)
    return [m.value for m in sorted(got, key=lambda m: (m.partition, m.offset)) if m.key == key]


def first_copies(values: list[bytes]) -> list[bytes]:
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def test_broker_killed_unseen_topic_broker_back_before_the_deadline(
    dsn, bootstrap, topic, second_topic, broker_restored
):
    with in_process_relay(relay_config(dsn, bootstrap)) as relay:
        warm_up(relay, dsn, topic)  # TOPIC's metadata is now cached; SECOND_TOPIC's not
        kill_broker()
        commit_the_sequence(dsn, topic, second_topic)
        batch = threading.Thread(target=relay.run_once)
        started = time.monotonic()
        batch.start()
        broker_back(bootstrap)  # a few seconds: longer than metadata_timeout, within the deadline
        batch.join(60)
        assert not batch.is_alive()
        assert time.monotonic() - started <= 20.0 + SEND_MARGIN + 5
        run_until_confirmed(relay, dsn, 15)
    assert_sequence_in_order(dsn, bootstrap, topic, second_topic)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT max(attempts) FROM local_message").fetchone() == (0,)


def test_broker_back_after_the_deadline(dsn, bootstrap, topic, second_topic, broker_restored):
    cfg = relay_config(
        dsn, bootstrap, flush_timeout=5.0, lease_seconds=20.0, heartbeat_interval=2.0
    )
    with in_process_relay(cfg) as relay:
        warm_up(relay, dsn, topic)
        kill_broker()
        commit_the_sequence(dsn, topic, second_topic)
        started = time.monotonic()
        relay.run_once()  # the whole batch, with no broker at all
        took = time.monotonic() - started
        assert took <= 5.0 + SEND_MARGIN, f"the batch took {took:.1f}s"
        assert counts(dsn) == {"CONFIRMED": 1, "PENDING": 14}
        broker_back(bootstrap)
        run_until_confirmed(relay, dsn, 15)
    assert_sequence_in_order(dsn, bootstrap, topic, second_topic)


def test_relay_sigkilled_while_the_batch_waits(
    dsn, bootstrap, topic, second_topic, relays, broker_restored
):
    first = relays("stalled")
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=topic, key="k1", payload={"m": "warmup"})
    wait_for(lambda: counts(dsn).get("CONFIRMED") == 1, 60, "the warm-up delivered")
    kill_broker()
    commit_the_sequence(dsn, topic, second_topic)
    # The unseen topic's lookup fails within metadata_timeout; a and b then wait in the producer.
    wait_for(lambda: "topic metadata" in first.log(), 30, "the relay in the stalled batch")
    first.kill()
    broker_back(bootstrap)
    second = relays("after")
    wait_for(lambda: counts(dsn).get("CONFIRMED") == 15, 120, "everything delivered")
    assert second.stop() == 0
    assert_sequence_in_order(dsn, bootstrap, topic, second_topic)


def set_topic_limit(bootstrap: str, topic: str, limit: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(
                "max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET
            )
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)

    def applied() -> bool:
        entries = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)])
        (future,) = entries.values()
        return future.result(timeout=10)["max.message.bytes"].value == str(limit)

    wait_for(applied, 30, f"max.message.bytes={limit} on {topic}")


def test_earlier_message_rejected_after_later_ones_were_queued(dsn, bootstrap):
    """The relay cached the topic's limit; an operator lowered it. The relay has no reason to
    send the large message alone, so the broker rejects it while the later messages of its key
    are already queued behind it, each in its own request (batch.num.messages=1): none of them
    may land before it."""
    topic = f"t.limit.{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, partitions=1)
    cfg = relay_config(dsn, bootstrap, max_attempts=1, kafka={"batch.num.messages": "1"})
    with in_process_relay(cfg) as relay:
        with psycopg.connect(dsn) as conn, conn.transaction():
            outbox.publish(conn, topic=topic, key="k", payload={"m": "warmup"})
        run_until_confirmed(relay, dsn, 1)  # the topic's limit (1 MB) is cached for a minute
        set_topic_limit(bootstrap, topic, 3000)
        with psycopg.connect(dsn) as conn, conn.transaction():
            # lz4 can't shrink it
            outbox.publish(conn, topic=topic, key="k", payload=os.urandom(5000))
            outbox.publish_many(
                conn, [dict(topic=topic, key="k", payload={"m": f"b{i}"}) for i in range(5)]
            )
            outbox.publish(conn, topic=topic, key="other", payload={"m": "c"})
        deadline = time.monotonic() + 60
        while counts(dsn).get("FAILED", 0) < 1 or counts(dsn).get("CONFIRMED", 0) < 2:
            assert time.monotonic() < deadline, counts(dsn)
            if relay.run_once() == 0:
                time.sleep(0.2)
        assert counts(dsn) == {"CONFIRMED": 2, "FAILED": 1, "PENDING": 5}, "b0..b4 held"
        assert relay.sink.resets >= 1, "the gapless guarantee stopped the producer"
        got = read_all(bootstrap, topic, expected=2)
        assert sorted(m.value for m in got if m.key == b"k") == [b'{"m":"warmup"}']
        # The operator raises the limit again and replays the row: everything, in order.
        set_topic_limit(bootstrap, topic, 1_048_588)
        with psycopg.connect(dsn) as conn:
            operations.replay(conn, "public", Selection(statuses=["FAILED"]), "test")
        run_until_confirmed(relay, dsn, 8)
    values = values_of_key(bootstrap, topic, b"k", 7)
    firsts = first_copies(values)
    assert firsts[0] == b'{"m":"warmup"}' and len(firsts[1]) == 5000
    assert firsts[2:] == [b'{"m":"b%d"}' % i for i in range(5)]
    verify(dsn, bootstrap, topic).assert_clean()
    delete_topic(bootstrap, topic)


def message(i: int, topic: str, key: bytes) -> PendingMessage:
    return PendingMessage(
        i,
        uuid.uuid4(),
        topic,
        key,
        b"%08d" % i + b"x" * 248,
        [],
        0,
        dt.datetime.now(dt.timezone.utc),
    )


def high_watermark(bootstrap: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "hw"})
    try:
        parts = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] for p in parts
        )
    finally:
        consumer.close()


def test_a_batch_is_bounded_when_the_broker_stops_in_its_middle(bootstrap, topic, broker_restored):
    """SIGSTOP, the worst kind of outage: connections stay open and nothing answers. From its
    first lookup to its last outcome the batch takes at most flush_timeout + SEND_MARGIN."""
    flush_timeout = 5.0
    sink = KafkaSink(
        {"bootstrap.servers": bootstrap, "linger.ms": "20"},
        flush_timeout=flush_timeout,
        metadata_timeout=2.0,
    )
    batch = [message(i, topic, key=b"k%d" % (i % 50)) for i in range(1, 150_001)]
    result: dict[str, object] = {}

    def send() -> None:
        started = time.monotonic()
        result["outcomes"] = sink.send(batch)
        result["took"] = time.monotonic() - started

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(lambda: high_watermark(bootstrap, topic) > 0, 30, "the batch under way")
        os.kill(broker_pid(), signal.SIGSTOP)
        sender.join(flush_timeout + SEND_MARGIN + 30)
        assert not sender.is_alive(), "send() did not return"
    finally:
        os.kill(broker_pid(), signal.SIGCONT)
    took = result["took"]
    assert took <= flush_timeout + SEND_MARGIN, f"the batch took {took:.1f}s"
    outcomes = result["outcomes"]
    delivered = [o for o in outcomes if isinstance(o, Delivered)]
    undecided = [o for o in outcomes if isinstance(o, Failed)]
    assert delivered and undecided, "the broker stopped in the middle of the batch"
    assert {o.kind for o in undecided} <= {FailureKind.UNKNOWN, FailureKind.OUTAGE}
    # Within each key, the delivered messages are a prefix: nothing after an undecided one.
    by_id = {m.id: m for m in batch}
    undecided_keys = {}
    for o in sorted(outcomes, key=lambda o: o.id):
        key = by_id[o.id].key
        if isinstance(o, Failed):
            undecided_keys.setdefault(key, o.id)
        else:
            assert key not in undecided_keys, f"row {o.id} delivered after {undecided_keys[key]}"
    # Sent again once the broker answers: Kafka holds every key's messages in row order.
    wait_for(lambda: check_kafka(bootstrap) is None, 60, "the broker answering")
    retry = [by_id[o.id] for o in undecided]
    again = sink.send(retry)
    assert all(isinstance(o, Delivered) for o in again)
    sink.close(5)
    got = read_all(bootstrap, topic, expected=len(batch), timeout=120)
    last: dict[bytes, int] = {}
    seen: set[bytes] = set()
    for m in sorted(got, key=lambda m: (m.partition, m.offset)):
        if m.value in seen:
            continue
        seen.add(m.value)
        row = int(m.value[:8])
        assert last.get(m.key, 0) < row, f"key {m.key!r}: row {row} after {last.get(m.key)}"
        last[m.key] = row
    assert len(seen) == len(batch)
