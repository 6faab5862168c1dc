"""Exactly-once delivery against the real pair: each row once in Kafka for a read_committed
consumer, recovery from the progress records, fencing, and the refusals at start."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from relay.config import ConfigError, RelayConfig
from relay.kafka import ShardProducer, TransactionalSink, check_progress_topic
from relay.model import Delivered, Failed, FailureKind, PendingMessage
from relay.runner import build_relay, check_exactly_once, run_relay
from relay.shards import buckets_of, decode_progress
from tests.integration.conftest import counts, write
from tests.kafka_helpers import create_topic, delete_topic
from tests.verify import verify

SHARDS = 4


@pytest.fixture
def progress_topic(bootstrap):
    name = f"progress.{uuid.uuid4().hex[:12]}"
    assert check_progress_topic({"bootstrap.servers": bootstrap}, name, SHARDS, create=True) is None
    yield name
    delete_topic(bootstrap, name)


def eos_config(dsn, bootstrap, progress_topic, **overrides) -> RelayConfig:
    return RelayConfig.from_env(
        {},
        dsn=dsn,
        bootstrap_servers=bootstrap,
        delivery="exactly-once",
        shards=SHARDS,
        progress_topic=progress_topic,
        # A prefix of its own: no other test's producers are fenced.
        transactional_id_prefix=f"test-{uuid.uuid4().hex[:8]}",
        listen=False,
        **overrides,
    )


def test_each_row_reaches_a_read_committed_consumer_once(dsn, bootstrap, topic, progress_topic):
    write(dsn, topic, 3000, keys=40)
    cfg = eos_config(dsn, bootstrap, progress_topic, batch_size=500)
    assert run_relay(cfg, threading.Event(), until_idle=True) == 0
    verdict = verify(dsn, bootstrap, topic)
    verdict.assert_clean(allow_duplicates=False)
    assert verdict.received == 3000
    # Every shard that carried rows has committed progress naming only rows of its buckets.
    last = last_progress(bootstrap, progress_topic)
    with psycopg.connect(dsn) as conn:
        bucket_of = dict(conn.execute("SELECT id, bucket FROM local_message").fetchall())
    assert last, "no progress record was committed"
    for shard, ids in last.items():
        assert ids and {bucket_of[i] for i in ids} <= set(buckets_of(shard, SHARDS))


def last_progress(bootstrap, progress_topic) -> dict[int, list[int]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        consumer.assign([TopicPartition(progress_topic, s, 0) for s in range(SHARDS)])
        found: dict[int, list[int]] = {}
        open_ = set(range(SHARDS))
        for _ in range(200):
            if not open_:
                break
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                open_.discard(msg.partition())
                continue
            found[msg.partition()] = decode_progress(msg.value(), SHARDS, msg.partition())
        assert not open_, f"partitions {open_} not read to their end"
        return found
    finally:
        consumer.close()
