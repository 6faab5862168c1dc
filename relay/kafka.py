"""The only module that imports confluent_kafka: the Kafka sink of the relay.

``KafkaSink.send(batch)`` produces every message of a batch, serves delivery reports until all
are in or the flush deadline passes, and returns one outcome per message. A message with no
report by then is purged from the producer and reported UNKNOWN: it may still be in Kafka, so
it is retried (a duplicate is possible) but never treated as failed-and-safe.

Order on failure. The idempotent producer keeps a partition's order through retries, but when
the broker rejects one request for good (a message too large for its topic, say), librdkafka
goes on with the partition's later requests: a later message of the same key could land while
the rejected one waits for a retry. So a message that may be rejected is never sent alongside
later ones: a missing topic is found in the metadata before producing; a message larger than
its topic's ``max.message.bytes`` (before compression), and every message the relay asks to
isolate, is sent alone, after everything before it was acknowledged, and its outcome is known
before the next message of the batch is produced. When it fails, the later messages of its key
are held back (send_in_key_order). A request rejected with several messages in it does not
say which one was at fault: those messages come back ISOLATE, to be sent alone next time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from .model import Delivered, Failed, FailureKind, Outcome, PendingMessage, send_in_key_order

log = logging.getLogger(__name__)

#: Producer settings the relay's guarantees rest on; the user's passthrough cannot weaken them.
REQUIRED_PRODUCER_CONFIG: Mapping[str, str] = {
    "enable.idempotence": "true",
    "acks": "all",
}

#: Defaults tuned for throughput at a small latency cost; every one can be overridden.
DEFAULT_PRODUCER_CONFIG: Mapping[str, str] = {
    "linger.ms": "5",
    "compression.type": "lz4",
    "batch.size": "1000000",
    "queue.buffering.max.messages": "200000",
    "message.timeout.ms": "30000",
    "socket.keepalive.enable": "true",
}

# Errors that say "this message cannot be delivered as it is", whatever the cluster's health.
_PERMANENT = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._INVALID_ARG,
}

# Errors that say "the cluster is not reachable or not taking writes now".
_OUTAGE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError._PURGE_QUEUE,
}

# Errors after which the message may or may not be in Kafka (librdkafka INTRODUCTION.md,
# "Message timeout considerations"): retried, never counted as failed-and-safe.
_UNKNOWN = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._PURGE_INFLIGHT,
}


def classify(err: KafkaError) -> FailureKind:
    code = err.code()
    if err.fatal() or code in _UNKNOWN:
        return FailureKind.UNKNOWN
    if code in _PERMANENT:
        return FailureKind.PERMANENT
    if code in _OUTAGE:
        return FailureKind.OUTAGE
    return FailureKind.TRANSIENT


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


#: Room for the record and batch framing around a message's own bytes.
_FRAMING_BYTES = 512

#: Settings an AdminClient shares with the producer (connection and security).
_CLIENT_PREFIXES = ("bootstrap.", "security.", "sasl.", "ssl.", "socket.", "client.", "broker.",
                    "metadata.", "reconnect.", "connections.", "api.", "debug")


def message_size(message: PendingMessage) -> int:
    """The bytes of a message before compression: payload, key and headers."""
    size = len(message.payload) + len(message.key or b"") + 10 + 36  # + the message_id header
    if message.headers:
        size += sum(len(name) + len(value or b"") for name, value in message.headers)
    return size


class Sink(Protocol):
    """Where the relay sends messages (relay.testing has a recording one)."""

    def send(
        self, batch: Sequence[PendingMessage], alone: frozenset[int] = frozenset()
    ) -> list[Outcome]:
        """One outcome per message, in batch order. Messages whose id is in ALONE are sent
        alone (see the module's docstring)."""

    def close(self, timeout: float) -> None: ...


class _Topic:
    __slots__ = ("problem", "max_bytes", "until")

    def __init__(self, problem: Failed | None, max_bytes: int | None, until: float):
        self.problem, self.max_bytes, self.until = problem, max_bytes, until


class KafkaSink:
    def __init__(self, config: Mapping[str, str], flush_timeout: float = 45.0):
        self._config = {**DEFAULT_PRODUCER_CONFIG, **config, **REQUIRED_PRODUCER_CONFIG}
        self._flush_timeout = flush_timeout
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._topics: dict[str, _Topic] = {}
        self._fatal = False
        self.resets = 0

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._fatal = False
            self._producer = Producer({**self._config, "error_cb": self._on_error}, logger=log)
        return self._producer

    def _on_error(self, err: KafkaError) -> None:
        # Client-level errors (brokers down, authentication, fatal idempotence errors). Without
        # this callback librdkafka's fatal errors surface as exceptions in unrelated calls.
        if err.fatal():
            self._fatal = True
            log.error("Kafka producer fatal error, it will be recreated: %s", describe(err))
        else:
            log.warning("Kafka: %s", describe(err))

    def reset(self) -> None:
        """Drop the producer after a fatal error; the next send makes a new one."""
        if self._producer is not None:
            self._producer.purge()
            self._producer.flush(0)
            self._producer = None
            self._topics.clear()
            self.resets += 1

    def close(self, timeout: float) -> None:
        if self._producer is not None:
            self._producer.flush(timeout)
            self._producer = None

    # -- topics

    def _topic(self, topic: str) -> _Topic:
        """Whether TOPIC exists and its max.message.bytes, cached for a minute."""
        now = time.monotonic()
        known = self._topics.get(topic)
        if known is not None and known.until > now:
            return known
        try:
            md = self.producer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as exc:
            err = exc.args[0]
            # Not cached: the cluster may be back at the next batch.
            return _Topic(Failed(0, classify(err), describe(err)), None, 0.0)
        err = md.error if md is not None else None
        if md is None or (err is not None and err.code() in _PERMANENT):
            why = describe(err) if err is not None else "topic not in metadata"
            info = _Topic(Failed(0, FailureKind.PERMANENT, f"{why} (topic {topic!r})"), None,
                          now + 5.0)
        elif err is not None:
            info = _Topic(Failed(0, classify(err), describe(err)), None, 0.0)
        else:
            info = _Topic(None, self._max_message_bytes(topic), now + 60.0)
        self._topics[topic] = info
        return info

    def _max_message_bytes(self, topic: str) -> int | None:
        try:
            if self._admin is None:
                settings = {k: v for k, v in self._config.items() if k.startswith(_CLIENT_PREFIXES)}
                self._admin = AdminClient({**settings, "error_cb": self._on_error}, logger=log)
            resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
            configs = self._admin.describe_configs([resource], request_timeout=10)
            entries = configs[resource].result(timeout=10)
            return int(entries["max.message.bytes"].value)
        except Exception as exc:  # noqa: BLE001 - no DescribeConfigs right: just no pre-check
            log.debug("cannot read max.message.bytes of %s: %s", topic, exc)
            return None

    # -- sending

    def send(
        self, batch: Sequence[PendingMessage], alone: frozenset[int] = frozenset()
    ) -> list[Outcome]:
        producer = self.producer
        outcomes: dict[int, Outcome] = {}
        sent_alone: set[int] = set()
        deadline = time.monotonic() + self._flush_timeout

        def on_delivery(row_id: int):
            # Runs inside poll()/flush() on this thread (confluent-kafka-python #417): no
            # locking needed, and no poll() in here (#457).
            def report(err: KafkaError | None, msg) -> None:
                if err is None:
                    outcomes[row_id] = Delivered(row_id, msg.partition(), msg.offset())
                else:
                    outcomes[row_id] = Failed(row_id, classify(err), describe(err), err.fatal())

            return report

        produced = 0

        def produce(message: PendingMessage) -> Failed | None:
            nonlocal produced
            headers = [("message_id", str(message.message_id).encode())]
            if message.headers:
                headers.extend(message.headers)
            while True:
                try:
                    producer.produce(
                        message.topic,
                        value=message.payload,
                        key=message.key,
                        headers=headers,
                        on_delivery=on_delivery(message.id),
                    )
                    produced += 1
                    if produced % 256 == 0:  # serve reports now and then, not per message
                        producer.poll(0)
                    return None
                except BufferError:
                    # The local queue is full: serve reports to make room, then try again.
                    if time.monotonic() >= deadline:
                        return Failed(message.id, FailureKind.OUTAGE, "producer queue full")
                    producer.poll(0.05)
                except KafkaException as exc:
                    err = exc.args[0]
                    return Failed(message.id, classify(err), describe(err), err.fatal())

        def produce_one(message: PendingMessage) -> Failed | None:
            topic = self._topic(message.topic)
            if topic.problem is not None:
                return Failed(message.id, topic.problem.kind, topic.problem.error)
            risky = message.id in alone or (
                topic.max_bytes is not None
                and message_size(message) > topic.max_bytes - _FRAMING_BYTES
            )
            if not risky:
                return produce(message)
            # Alone: everything before it acknowledged first, its own outcome known before
            # the next message is produced.
            producer.flush(max(0.0, deadline - time.monotonic()))
            sent_alone.add(message.id)
            failure = produce(message)
            if failure is not None:
                return failure
            producer.flush(max(0.0, deadline - time.monotonic()))
            outcome = outcomes.pop(message.id, None)
            if isinstance(outcome, Failed):
                return outcome
            if outcome is not None:
                outcomes[message.id] = outcome
            return None

        # Failures found before or while producing (missing topic, refused by the producer, a
        # message sent alone): each is this message's own. Reports come into `outcomes`.
        early = send_in_key_order(batch, produce_one)

        # flush() returns how many are still queued instead of raising (#762).
        remaining = producer.flush(max(0.0, deadline - time.monotonic()))
        fatal = self._fatal or any(isinstance(o, Failed) and o.fatal for o in outcomes.values())
        if remaining or fatal:
            # No report yet: take them back out of the producer, so that they cannot reach
            # Kafka later behind newer messages, and report them as unknown.
            producer.purge(in_queue=True, in_flight=True)
            producer.flush(5.0)
        if fatal:
            self.reset()
        result: list[Outcome] = []
        for message in batch:
            outcome = early.get(message.id) or outcomes.get(message.id)
            if outcome is None:
                outcome = Failed(
                    message.id, FailureKind.UNKNOWN, "no delivery report before the flush deadline"
                )
            elif (isinstance(outcome, Failed) and outcome.kind is FailureKind.PERMANENT
                  and message.id not in early and message.id not in sent_alone):
                # Rejected in a request shared with other messages: which one was at fault is
                # not known. Nobody's attempt is counted; the relay sends them alone next time.
                outcome = Failed(message.id, FailureKind.ISOLATE, outcome.error)
            result.append(outcome)
        return result


def check_kafka(config: Mapping[str, str], timeout: float = 5.0) -> str | None:
    """None when a broker answers a metadata request with CONFIG's connection settings, else
    why not (for /readyz and `outbox doctor`)."""
    settings = {k: v for k, v in config.items() if k.startswith(_CLIENT_PREFIXES)}
    problems: list[str] = []
    try:
        admin = AdminClient({**settings, "error_cb": lambda e: problems.append(describe(e))},
                            logger=log)
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return describe(exc.args[0]) + (f" ({problems[-1]})" if problems else "")
    return None


def missing_topics(config: Mapping[str, str], topics: Sequence[str]) -> list[str]:
    """Which of TOPICS the cluster does not have."""
    if not topics:
        return []
    settings = {k: v for k, v in config.items() if k.startswith(_CLIENT_PREFIXES)}
    existing = AdminClient(settings, logger=log).list_topics(timeout=10).topics
    return sorted(t for t in topics if t not in existing)
