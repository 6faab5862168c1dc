"""Topics for the benchmarks, made with the relay's own admin calls (relay.kafka.admin), so that
bench/ needs nothing from tests/."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from relay.kafka import create_topics, wait_for_leaders


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    """NAME with PARTITIONS and one replica, once a producer can write to it."""
    config = {"bootstrap.servers": bootstrap}
    outcome = create_topics(config, [name], partitions, 1, timeout=30)[name]
    if outcome.error is not None:
        raise RuntimeError(f"cannot create topic {name}: {outcome.error}")
    if wait_for_leaders(config, [name], timeout=30)[name] is None:
        raise TimeoutError(f"topic {name} has no leaders after 30 s")


def delete_topic(bootstrap: str, name: str) -> None:
    """Delete NAME if it exists (deletion completes in the background)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics([name], operation_timeout=30).values():
        try:
            future.result(timeout=30)
        except KafkaException:
            pass  # no such topic
