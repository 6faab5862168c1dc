"""Kafka helpers for tests: topics, and an independent consumer that reads what arrived."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def check_kafka(servers: str, timeout: float = 5.0) -> str | None:
    """None when a broker answers a metadata request, else why not."""
    if not servers:
        return "no bootstrap servers configured"
    try:
        AdminClient({"bootstrap.servers": servers}).list_topics(timeout=timeout)
    except KafkaException as exc:
        return str(exc.args[0])
    return None


def create_topic(servers: str, name: str, partitions: int = 3, config: dict | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": servers})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        operation_timeout=30,
    )
    for future in futures.values():
        future.result(timeout=30)
    # The producer must see the topic with leaders before tests send to it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(name, timeout=5).topics.get(name)
        if (
            md
            and md.error is None
            and md.partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no leaders after 30s")


def delete_topic(servers: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": servers})
    for future in admin.delete_topics([name], operation_timeout=30).values():
        try:
            future.result(timeout=30)
        except KafkaException:
            pass


@dataclass(frozen=True)
class Received:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    #: The record's timestamp (the producer's clock when it was produced), in milliseconds.
    timestamp_ms: int = 0

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


def read_all(servers: str, topic: str, expected: int, timeout: float = 60.0) -> list[Received]:
    """Read TOPIC from the beginning until EXPECTED messages arrived or TIMEOUT passed, then
    keep reading briefly to catch extra (duplicate) messages. Order within a partition kept."""
    consumer = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": f"verify-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
        out: list[Received] = []
        deadline = time.monotonic() + timeout
        settle_until = None
        while time.monotonic() < deadline:
            if len(out) >= expected and settle_until is None:
                settle_until = time.monotonic() + 1.0
            if settle_until is not None and time.monotonic() >= settle_until:
                break
            for msg in consumer.consume(num_messages=1000, timeout=0.2):
                if msg.error():
                    continue
                out.append(
                    Received(
                        msg.topic(),
                        msg.partition(),
                        msg.offset(),
                        msg.key(),
                        msg.value(),
                        list(msg.headers() or []),
                        msg.timestamp()[1],
                    )
                )
        return out
    finally:
        consumer.close()
