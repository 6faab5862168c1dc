"""The admin side: the cluster checks of /readyz, `outbox doctor` and the relay's start (a
broker answers, topics exist, the progress topic's shape, transactions available, topics'
max.message.bytes), and the topic calls of `outbox topics` (describe, create, wait for
leaders)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from outbox.errors import OutboxError

from ..model import SEND_MARGIN
from .client import client_settings, describe, new_client
from .transactional import transaction_timeout

#: One logger for the package, not one per module: the relay's outage log (runner.py), log filters
#: and the JSON lines' "logger" field know it as relay.kafka.
log = logging.getLogger("relay.kafka")


def check_kafka(config: Mapping[str, str], timeout: float = 5.0) -> str | None:
    """None when a broker answers a metadata request with CONFIG's connection settings, else
    why not (for /readyz and `outbox doctor`)."""
    settings = client_settings(config)
    problems: list[str] = []
    try:
        # error_cb is a librdkafka setting; AdminClient's stub allows only scalars.
        admin = AdminClient(
            {**settings, "error_cb": lambda e: problems.append(describe(e))},  # type: ignore[dict-item]
            logger=log,
        )
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return describe(exc.args[0]) + (f" ({problems[-1]})" if problems else "")
    return None


def missing_topics(config: Mapping[str, str], topics: Sequence[str]) -> list[str]:
    """Which of TOPICS the cluster does not have."""
    if not topics:
        return []
    settings = client_settings(config)
    existing = AdminClient(settings, logger=log).list_topics(timeout=10).topics
    return sorted(t for t in topics if t not in existing)


def check_progress_topic(
    config: Mapping[str, str], topic: str, shards: int, *, create: bool = False
) -> str | None:
    """None when TOPIC can hold exactly-once progress for SHARDS shards (exists, compacted,
    exactly SHARDS partitions), else what is wrong and how to fix it. CREATE: make it if it is
    missing (`outbox migrate --kafka`)."""
    settings = client_settings(config)
    admin = AdminClient(settings, logger=log)
    fix = f"outbox migrate --kafka --shards {shards} --progress-topic {topic}"
    try:
        found = admin.list_topics(topic, timeout=10).topics.get(topic)
        if found is None or found.error is not None:
            if not create:
                return f"progress topic {topic!r} does not exist: create it with `{fix}`"
            future = admin.create_topics(
                [NewTopic(topic, shards, config={"cleanup.policy": "compact"})],
                request_timeout=10,
            )[topic]
            future.result(timeout=15)
            return None
        if len(found.partitions) != shards:
            return (
                f"progress topic {topic!r} has {len(found.partitions)} partitions; the relay "
                f"runs with {shards} shards and needs exactly as many (set OUTBOX_SHARDS="
                f"{len(found.partitions)}, or, with every relay stopped, create a new topic: "
                f"outbox migrate --kafka --shards {shards} --progress-topic NEW-NAME)"
            )
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        entries = admin.describe_configs([resource], request_timeout=10)[resource].result(10)
        policy = entries["cleanup.policy"].value
        if policy != "compact":
            return (
                f"progress topic {topic!r} has cleanup.policy={policy}; it must be compact "
                "(alone: deleting old records could forget a shard's last progress). Fix: "
                f"kafka-configs.sh --alter --entity-type topics --entity-name {topic} "
                "--add-config cleanup.policy=compact"
            )
    except KafkaException as exc:
        return f"progress topic {topic!r}: {describe(exc.args[0])}"
    return None


def check_transactions(
    config: Mapping[str, str], prefix: str, flush_timeout: float, progress_topic: str
) -> str | None:
    """None when the cluster runs transactions for this relay, else why not: a throwaway
    transactional id under PREFIX is initialised (transactions supported, the id authorised,
    the transaction timeout accepted), and a record produced to PROGRESS_TOPIC in a
    transaction that is then aborted (the topic writable: without it every transaction
    would abort)."""
    producer = Producer(
        {
            **client_settings(config),
            "transactional.id": f"{prefix}-check-{uuid.uuid4().hex[:12]}",
            "transaction.timeout.ms": str(int(transaction_timeout(flush_timeout) * 1000)),
        },
        logger=log,
    )
    reports: list[KafkaError | None] = []
    try:
        producer.init_transactions(15)
        producer.begin_transaction()
        producer.produce(  # a compacted topic takes only records with a key
            progress_topic,
            key=b"check",
            value=b"",
            partition=0,
            on_delivery=lambda e, _m: reports.append(e),
        )
        producer.flush(15)
        producer.abort_transaction(15)
    except KafkaException as exc:
        err = exc.args[0]
        hint = (
            " (the broker's transaction.max.timeout.ms is below the relay's transaction "
            "timeout: flush_timeout + 6 s)"
            if err.code() == KafkaError.INVALID_TRANSACTION_TIMEOUT
            else ""
        )
        return f"Kafka transactions are not available: {describe(err)}{hint}"
    finally:
        producer.purge()
    if reports and reports[0] is not None:
        return f"progress topic {progress_topic!r} is not writable: {describe(reports[0])}"
    return None


def topic_limits(config: Mapping[str, str], topics: Sequence[str]) -> dict[str, int]:
    """The max.message.bytes of TOPICS, as far as they can be read (DescribeConfigs)."""
    if not topics:
        return {}
    settings = client_settings(config)
    admin = AdminClient(settings, logger=log)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
    limits = {}
    for resource, future in admin.describe_configs(resources, request_timeout=10).items():
        try:
            limits[resource.name] = int(future.result(timeout=10)["max.message.bytes"].value)
        except Exception as exc:  # noqa: BLE001 - not authorised: just not checked
            log.debug("cannot read max.message.bytes of %s: %s", resource.name, exc)
    return limits


class TopicShape(NamedTuple):
    """A topic as the cluster's metadata shows it."""

    partitions: int
    replication_factor: int
    #: Every partition has a leader: a producer can write to each of them.
    leaders: bool = True


class TopicCreation(NamedTuple):
    """What CreateTopics said about one topic: error None when it was created (or, validating
    only, would be), existed True when another client had created it first."""

    error: str | None
    existed: bool = False


def _servers(config: Mapping[str, str]) -> str:
    return str(config.get("bootstrap.servers", "?"))


def _shape(md) -> TopicShape | None:
    """A topic's shape from its metadata (None when absent or in error)."""
    if md is None or md.error is not None or not md.partitions:
        return None
    parts = md.partitions.values()
    return TopicShape(
        len(md.partitions),
        min(len(p.replicas) for p in parts),
        all(p.leader >= 0 for p in parts),
    )


def describe_topics(
    config: Mapping[str, str], names: Sequence[str], timeout: float = 10.0
) -> dict[str, TopicShape | None]:
    """The partitions and replication factor of each of NAMES (None: the cluster has no such
    topic), from one metadata request. A cluster that does not answer within TIMEOUT raises
    OutboxError, so that a wrong bootstrap address ends in seconds with one line."""
    admin = new_client(AdminClient, client_settings(config), logger=log)
    try:
        metadata = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise OutboxError(
            f"Kafka at {_servers(config)} is not reachable (no answer within {timeout:g}s; "
            "check the address, the listeners and security.protocol/sasl.*): "
            f"{describe(exc.args[0])}"
        ) from None
    return {name: _shape(metadata.get(name)) for name in names}


def create_topics(
    config: Mapping[str, str],
    names: Sequence[str],
    partitions: int | None,
    replication_factor: int | None,
    *,
    validate_only: bool = False,
    timeout: float = 10.0,
) -> dict[str, TopicCreation]:
    """Create NAMES with PARTITIONS and REPLICATION_FACTOR (None: the cluster's num.partitions
    and default.replication.factor). VALIDATE_ONLY: the broker checks the request and creates
    nothing. Each topic's outcome; a cluster that does not answer raises OutboxError."""
    if not names:
        return {}
    admin = new_client(AdminClient, client_settings(config), logger=log)
    new = [
        NewTopic(
            name,
            num_partitions=-1 if partitions is None else partitions,
            replication_factor=-1 if replication_factor is None else replication_factor,
        )
        for name in names
    ]
    try:
        futures = admin.create_topics(
            new, operation_timeout=timeout, request_timeout=timeout, validate_only=validate_only
        )
    except KafkaException as exc:
        raise OutboxError(f"Kafka at {_servers(config)}: {describe(exc.args[0])}") from None
    out = {}
    end = time.monotonic() + timeout + SEND_MARGIN
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.0, end - time.monotonic()))
            out[name] = TopicCreation(None)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                out[name] = TopicCreation(None, existed=True)
            else:
                out[name] = TopicCreation(describe(err))
        except FutureTimeout:
            out[name] = TopicCreation(f"no answer from Kafka within {timeout:g}s")
    return out


def wait_for_leaders(
    config: Mapping[str, str], names: Sequence[str], timeout: float = 10.0
) -> dict[str, TopicShape | None]:
    """The shapes of NAMES once every partition of each has a leader (a producer can write to
    them), or as they are when TIMEOUT passes (None, or leaders False: not ready then)."""
    admin = new_client(AdminClient, client_settings(config), logger=log)
    end = time.monotonic() + timeout
    wanted = set(names)
    while True:
        try:
            metadata = admin.list_topics(timeout=max(0.1, end - time.monotonic())).topics
        except KafkaException:
            metadata = {}
        ready = {t for t in wanted if (shape := _shape(metadata.get(t))) and shape.leaders}
        if ready == wanted or time.monotonic() >= end:
            break
        time.sleep(0.1)
    return {t: _shape(metadata.get(t)) for t in names}
