"""The only module that imports confluent_kafka: the Kafka sink of the relay.

``KafkaSink.send(batch)`` produces every message of a batch, serves delivery reports until all
are in or the flush deadline passes, and returns one outcome per message. A message with no
report by then is purged from the producer and reported UNKNOWN: it may still be in Kafka, so
it is retried (a duplicate is possible) but never treated as failed-and-safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

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
    KafkaError._MSG_SIZE_TOO_LARGE if hasattr(KafkaError, "_MSG_SIZE_TOO_LARGE") else -10**6,
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


class Sink(Protocol):
    """Where the relay sends messages (relay.testing has a recording one)."""

    def send(self, batch: Sequence[PendingMessage]) -> list[Outcome]: ...

    def close(self, timeout: float) -> None: ...


class KafkaSink:
    def __init__(self, config: Mapping[str, str], flush_timeout: float = 45.0):
        self._config = {**DEFAULT_PRODUCER_CONFIG, **config, **REQUIRED_PRODUCER_CONFIG}
        self._flush_timeout = flush_timeout
        self._producer: Producer | None = None
        self._known_topics: dict[str, float] = {}
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
            self._known_topics.clear()
            self.resets += 1

    def close(self, timeout: float) -> None:
        if self._producer is not None:
            self._producer.flush(timeout)
            self._producer = None

    def _topic_problem(self, topic: str) -> Failed | None:
        """A missing topic is a message-specific permanent error; find it before producing,
        so that later messages of the same keys are held back (send_in_key_order) instead of
        being delivered ahead of it. Known topics are cached for a minute."""
        now = time.monotonic()
        if self._known_topics.get(topic, 0.0) > now:
            return None
        md = self.producer.list_topics(topic, timeout=10).topics.get(topic)
        err = md.error if md is not None else None
        if md is None or (err is not None and err.code() in _PERMANENT):
            why = describe(err) if err is not None else "topic not in metadata"
            return Failed(0, FailureKind.PERMANENT, f"{why} (topic {topic!r})")
        if err is not None:
            return Failed(0, classify(err), describe(err))
        self._known_topics[topic] = now + 60.0
        return None

    def send(self, batch: Sequence[PendingMessage]) -> list[Outcome]:
        producer = self.producer
        outcomes: dict[int, Outcome] = {}
        fatal_seen = False

        def on_delivery(row_id: int):
            # Runs inside poll()/flush() on this thread (confluent-kafka-python #417): no
            # locking needed, and no poll() in here (#457).
            def report(err: KafkaError | None, msg) -> None:
                nonlocal fatal_seen
                if err is None:
                    outcomes[row_id] = Delivered(row_id, msg.partition(), msg.offset())
                else:
                    fatal_seen = fatal_seen or err.fatal()
                    outcomes[row_id] = Failed(row_id, classify(err), describe(err), err.fatal())

            return report

        deadline = time.monotonic() + self._flush_timeout
        topic_problems: dict[str, Failed | None] = {}

        def produce_one(message: PendingMessage) -> Failed | None:
            if message.topic not in topic_problems:
                try:
                    topic_problems[message.topic] = self._topic_problem(message.topic)
                except KafkaException as exc:
                    err = exc.args[0]
                    topic_problems[message.topic] = Failed(0, classify(err), describe(err))
            problem = topic_problems[message.topic]
            if problem is not None:
                return Failed(message.id, problem.kind, problem.error)
            headers = [("message_id", str(message.message_id).encode())]
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

        outcomes.update(send_in_key_order(batch, produce_one))

        # flush() returns how many are still queued instead of raising (#762).
        remaining = producer.flush(max(0.0, deadline - time.monotonic()))
        fatal_seen = fatal_seen or self._fatal
        if remaining or fatal_seen:
            # No report yet: take them back out of the producer, so that they cannot reach
            # Kafka later behind newer messages, and report them as unknown.
            producer.purge(in_queue=True, in_flight=True)
            producer.flush(5.0)
        if fatal_seen:
            self.reset()
        result: list[Outcome] = []
        for message in batch:
            outcome = outcomes.get(message.id)
            if outcome is None:
                outcome = Failed(
                    message.id, FailureKind.UNKNOWN, "no delivery report before the flush deadline"
                )
            result.append(outcome)
        return result
