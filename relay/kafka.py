"""The only module that imports confluent_kafka: the Kafka sink of the relay.

``KafkaSink.send(batch)`` produces every message of a batch, serves delivery reports until all
are in or the batch's deadline passes, and returns one outcome per message.

Order by construction. A key's messages go to one partition, in row order; Kafka keeps them in
that order only if no earlier message of the key can fail while a later one succeeds. So:

- the batch owns the deadline, not librdkafka: the producer runs with ``message.timeout.ms=0``
  (no local timeout), and when ``flush_timeout`` passes every message without a report is
  purged and reported UNKNOWN, all of them at once, so none of a key's messages can be
  acknowledged after an earlier one of that key timed out. A purge leaves a gap in the
  producer's sequence numbers, so the producer is then replaced (a new producer id);
- the batch's topics are looked up once, before anything is produced, within a bounded wait:
  a topic that cannot be looked up fails its messages before they reach the producer, and a
  missing topic fails them for good, so no blocking call sits between two messages of a key;
- a message that fails before it reaches the producer, or whose failure report arrives while
  the batch is still being produced, holds back every later message of its key in the batch
  (send_in_key_order);
- the producer runs with ``enable.gapless.guarantee``: when the broker rejects a request for
  good, librdkafka would otherwise renumber and send the partition's later requests (which the
  broker refused as out of sequence), letting later messages of the key overtake the rejected
  ones. Instead it raises a fatal error; the later messages have not been written, they are
  purged and reported UNKNOWN, and the producer is replaced;
- a message that may be rejected (larger than its topic's ``max.message.bytes``, or rejected
  before in a request it shared with others) is sent alone: after everything before it was
  acknowledged, its own outcome known before the next message is produced. A request rejected
  with several messages in it does not say which one was at fault: those messages come back
  ISOLATE, to be sent alone next time.

Bounded. From the first lookup to the last report, ``send`` takes at most ``flush_timeout``
plus ``model.SEND_MARGIN`` seconds, whatever the cluster does.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from hashlib import sha256
from typing import NamedTuple, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from outbox.errors import OutboxError
from outbox.message import DEFAULT_MAX_MESSAGE_BYTES, RECORD_BATCH_OVERHEAD, record_size

from .config import ConfigError
from .model import (
    SEND_MARGIN,
    TOPIC_ERROR_TTL,
    Delivered,
    Failed,
    FailureKind,
    Outcome,
    PendingMessage,
    send_in_key_order,
)
from .outage_log import OutageLog
from .shards import (
    MAX_PROGRESS_IDS,
    Named,
    ProgressError,
    decode_progress,
    encode_progress,
    group_by_shard,
    message_tag,
    whole_shards,
)

log = logging.getLogger(__name__)

#: Producer settings the relay's guarantees rest on; the user's passthrough cannot weaken them
#: (RelayConfig refuses them with a reason).
REQUIRED_PRODUCER_CONFIG: Mapping[str, str] = {
    "enable.idempotence": "true",
    "acks": "all",
    # The batch's flush_timeout is the only deadline (see the module's docstring).
    "message.timeout.ms": "0",
    "enable.gapless.guarantee": "true",
    # Retries exhausted leave a gap that librdkafka renumbers around (no fatal error): never.
    "message.send.max.retries": "2147483647",
}


#: Defaults tuned for throughput at a small latency cost; every one can be overridden.
DEFAULT_PRODUCER_CONFIG: Mapping[str, str] = {
    "linger.ms": "5",
    "compression.type": "lz4",
    "batch.size": "1000000",
    "queue.buffering.max.messages": "200000",
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
    # The producer takes no messages in its state (a transaction failed and awaits its abort):
    # not the message's fault.
    KafkaError._STATE,
}

# Errors after which the message may or may not be in Kafka (librdkafka INTRODUCTION.md,
# "Message timeout considerations"): retried, never counted as failed-and-safe.
_UNKNOWN = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._PURGE_INFLIGHT,
    KafkaError._FATAL,
    # Idempotence state errors: the message may have been written ("possibly persisted").
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_EPOCH,
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


#: Longest single flush() call while serving reports (see KafkaSink._serve).
_SERVE_SLICE = 0.2

#: Settings an AdminClient shares with the producer (connection and security).
_CLIENT_PREFIXES = (
    "bootstrap.",
    "security.",
    "sasl.",
    "ssl.",
    "socket.",
    "client.",
    "broker.",
    "metadata.",
    "reconnect.",
    "connections.",
    "api.",
    "debug",
)


def client_settings(config: Mapping[str, str]) -> dict[str, str | int | float | bool]:
    """The settings of CONFIG that any client needs (connection and security): what an
    AdminClient, a consumer or a throwaway producer shares with the relay's producer."""
    return {k: v for k, v in config.items() if k.startswith(_CLIENT_PREFIXES)}


_Client = TypeVar("_Client")


class KafkaSettingsError(ConfigError):
    """librdkafka refused a client's settings (an unknown property, a value out of range, a
    file it cannot load): the configuration's fault, so exit 2 and one line, not a traceback."""


def new_client(kind: Callable[..., _Client], settings: Mapping[str, object], **kwargs) -> _Client:
    """KIND (Consumer, AdminClient, Producer) built from SETTINGS; a setting librdkafka
    refuses raises KafkaSettingsError, saying which one. Nothing is connected yet here, so
    any failure is the settings'."""
    try:
        return kind(settings, **kwargs)
    except KafkaException as exc:
        err = exc.args[0]
        why = err.str() if isinstance(err, KafkaError) else str(err)
    except (ValueError, TypeError) as exc:  # confluent-kafka's own checks of a value's type
        why = str(exc)
    raise KafkaSettingsError(f"Kafka settings refused: {why}") from None


def report_client_error(outage_log: OutageLog, err: KafkaError) -> None:
    """The producers' error_cb: client-level errors (brokers down, authentication), each
    distinct one logged once through the outage log. Fatal errors do not come here:
    confluent-kafka raises them from poll()/flush() (see KafkaSink._serve)."""
    outage_log.problem(err.name(), logging.WARNING, f"Kafka: {describe(err)}")


def message_size(message: PendingMessage) -> int:
    """The bytes of a message as a record, as the writer and librdkafka count them."""
    if not message.headers:  # the common case, without a call per message
        return _EMPTY_RECORD + len(message.payload) + (len(message.key) if message.key else 0)
    return record_size(message.key, message.payload, message.headers)


#: A record with no key, no payload and no headers of its own: record_size is linear in them.
_EMPTY_RECORD = record_size(None, b"")


class _Topic:
    __slots__ = ("max_bytes", "problem", "until")

    def __init__(self, problem: Failed | None, max_bytes: int | None, until: float):
        self.problem, self.max_bytes, self.until = problem, max_bytes, until


class KafkaSink:
    #: Settings this sink's producer cannot do without.
    required_config: Mapping[str, str] = REQUIRED_PRODUCER_CONFIG

    def __init__(
        self,
        config: Mapping[str, str],
        flush_timeout: float = 35.0,
        *,
        metadata_timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        outage_log: OutageLog | None = None,
    ):
        self._config = {
            **DEFAULT_PRODUCER_CONFIG,
            **config,
            **self.required_config,
            "message.max.bytes": str(max_message_bytes),
        }
        self._flush_timeout = flush_timeout
        self._metadata_timeout = metadata_timeout
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._topics: dict[str, _Topic] = {}
        self._fatal = False
        self.resets = 0
        #: librdkafka's logs and error callbacks go through this: each distinct problem once,
        #: then a summary now and then (a broker down for an hour is not 140,000 lines).
        self.outage_log = outage_log or OutageLog(log)

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._fatal = False
            self._producer = Producer(
                {**self._config, "error_cb": self._on_error}, logger=self.outage_log
            )
        return self._producer

    def _on_error(self, err: KafkaError) -> None:
        report_client_error(self.outage_log, err)

    def _serve(self, timeout: float) -> int:
        """Serve delivery reports for up to TIMEOUT seconds, until none is outstanding or the
        producer hit a fatal error; return how many messages are still unreported.

        confluent-kafka raises a fatal error (it is not passed to error_cb) only when flush()
        returns, so flush() is called in short slices: a fatal error ends the wait at once
        instead of at the deadline."""
        producer = self.producer
        end = time.monotonic() + max(0.0, timeout)
        while True:
            if self._fatal:  # caught by an earlier poll(): librdkafka sends nothing more
                return len(producer)
            try:
                remaining = producer.flush(max(0.0, min(_SERVE_SLICE, end - time.monotonic())))
            except (KafkaException, SystemError) as exc:
                # SystemError: confluent-kafka (2.16) calls the delivery callbacks queued
                # behind a fatal error with that error still set. Our callback stores its
                # report before anything can raise, so no report is lost; the next call
                # serves the rest.
                self._fatal = True
                log.error("Kafka producer fatal error, it will be replaced: %s", exc)
                try:
                    return producer.flush(0)
                except (KafkaException, SystemError):
                    return len(producer)
            if not remaining or time.monotonic() >= end:
                return remaining

    @staticmethod
    def _drain(producer: Producer, timeout: float) -> None:
        """Serve the reports of purged messages (and any behind a fatal error), for at most
        TIMEOUT seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if producer.flush(max(0.0, min(_SERVE_SLICE, end - time.monotonic()))) == 0:
                    return
            except (KafkaException, SystemError):
                pass  # the fatal error again: the reports behind it come with the next call

    def reset(self) -> None:
        """Replace the producer: the next send makes a new one, with a new producer id."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.purge(in_queue=True, in_flight=True)
                producer.flush(0)
            except (KafkaException, SystemError):
                pass
            self._topics.clear()
            self.resets += 1

    def close(self, timeout: float) -> None:
        if self._producer is not None:
            try:
                self._producer.flush(timeout)
            except (KafkaException, SystemError) as exc:
                log.warning("Kafka producer: %s", exc)
            self._producer = None

    # -- topics

    def _look_up_topics(self, names: set[str], deadline: float) -> dict[str, _Topic]:
        """Whether each topic exists and its max.message.bytes: cached for a minute, the rest
        asked in one metadata request and one DescribeConfigs, within metadata_timeout and the
        batch's deadline. A lookup that fails is not cached: the cluster may be back soon."""
        now = time.monotonic()
        found = {
            t: self._topics[t] for t in names if t in self._topics and self._topics[t].until > now
        }
        wanted = sorted(names - found.keys())
        if not wanted:
            return found
        end = min(now + self._metadata_timeout, deadline)  # the whole lookup, both requests
        try:
            return self._ask_for_topics(wanted, found, now, end)
        finally:
            log.debug(
                "looked up topics %s in %.0f ms",
                ", ".join(wanted)[:200],
                (time.monotonic() - now) * 1000,
            )

    def _ask_for_topics(
        self, wanted: list[str], found: dict[str, _Topic], now: float, end: float
    ) -> dict[str, _Topic]:
        budget = max(0.0, end - now)
        try:
            metadata = self.producer.list_topics(
                wanted[0] if len(wanted) == 1 else None, timeout=budget
            ).topics
        except KafkaException as exc:
            # Not the messages' fault, whatever the error: nothing is counted.
            problem = Failed(0, FailureKind.OUTAGE, f"topic metadata: {describe(exc.args[0])}")
            self.outage_log.problem(
                "metadata",
                logging.WARNING,
                f"topic metadata for {', '.join(wanted)[:200]} not available: "
                f"{problem.error}; their messages wait for a later batch",
            )
            found.update((t, _Topic(problem, None, 0.0)) for t in wanted)
            return found
        healthy = []
        for t in wanted:
            md = metadata.get(t)
            err = md.error if md is not None else None
            if md is None or (err is not None and err.code() in _PERMANENT):
                why = (
                    describe(err)
                    if err is not None
                    else "UNKNOWN_TOPIC_OR_PART: the cluster has no such topic"
                )
                info = _Topic(
                    Failed(0, FailureKind.PERMANENT, f"{why} (topic {t!r})"),
                    None,
                    now + TOPIC_ERROR_TTL,
                )
                self._topics[t] = info
            elif err is not None:
                info = _Topic(Failed(0, classify(err), describe(err)), None, 0.0)
            else:
                healthy.append(t)
                continue
            found[t] = info
        limits = self._max_message_bytes(healthy, end) if healthy else {}
        for t in healthy:
            found[t] = self._topics[t] = _Topic(None, limits.get(t), now + 60.0)
        return found

    def _max_message_bytes(self, topics: list[str], end: float) -> dict[str, int]:
        """The topics' max.message.bytes, as far as they can be read by END."""
        budget = end - time.monotonic()
        if budget <= 0:
            return {}
        try:
            if self._admin is None:
                settings = client_settings(self._config)
                # error_cb is a librdkafka setting; AdminClient's stub allows only scalars.
                self._admin = AdminClient(
                    {**settings, "error_cb": self._on_error},  # type: ignore[dict-item]
                    logger=self.outage_log,
                )
            resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
            futures = self._admin.describe_configs(resources, request_timeout=budget)
        except Exception as exc:  # noqa: BLE001 - no DescribeConfigs: just no pre-check
            log.debug("cannot read max.message.bytes of %s: %s", topics, exc)
            return {}
        limits = {}
        for resource, future in futures.items():
            try:
                entries = future.result(timeout=max(0.0, end - time.monotonic()))
                limits[resource.name] = int(entries["max.message.bytes"].value)
            except Exception as exc:  # noqa: BLE001 - not authorised, timed out
                log.debug("cannot read max.message.bytes of %s: %s", resource.name, exc)
        self._admin.poll(0)  # its log lines and error events are served only here
        return limits

    # -- sending

    def adopt(self, buckets: frozenset[int], lease_lapsed: bool) -> list[Named]:
        return []  # at least once: nothing is recorded in Kafka but the messages

    def send(
        self,
        batch: Sequence[PendingMessage],
        alone: frozenset[int] = frozenset(),
        unconfirmed: Sequence[int] = (),
    ) -> list[Outcome]:
        try:
            return self._send(batch, alone)
        except BaseException:
            # Whatever escaped (an interrupt, a bug): nothing of this batch may stay queued to
            # land later behind the copies the next batch will send.
            self._fatal = True
            self.reset()
            raise

    def _send(self, batch: Sequence[PendingMessage], alone: frozenset[int]) -> list[Outcome]:
        deadline = time.monotonic() + self._flush_timeout
        topics = self._look_up_topics({m.topic for m in batch}, deadline)
        producer = self.producer
        early, reports, sent_alone = self._produce_all(batch, alone, topics, deadline)
        # flush() returns how many are still queued instead of raising (#762).
        remaining = self._serve(deadline - time.monotonic())
        if remaining or self._fatal:
            # The deadline passed, or the producer cannot go on: take everything unreported
            # back out, so that none of it can reach Kafka later behind newer messages. All of
            # it is reported unknown below, in one go, whatever its key.
            try:
                producer.purge(in_queue=True, in_flight=True)
            except (KafkaException, SystemError):
                pass
            self._drain(producer, 1.0)
            self.reset()
        return self._outcomes(batch, early, reports, sent_alone)

    def _produce_all(
        self,
        batch: Sequence[PendingMessage],
        alone: frozenset[int],
        topics: dict[str, _Topic],
        deadline: float,
    ) -> tuple[dict[int, Failed], dict[int, Message], set[int]]:
        """Hand BATCH to the producer in key order (the module's docstring says how). Returns
        the failures known before the end (by row id), the delivery reports so far (filled in
        as they come), and the rows sent alone."""
        producer = self.producer
        # Reports as librdkafka gives them, by row id; read once the batch is over.
        reports: dict[int, Message] = {}
        # Keys with a failure report already in: their later messages are not produced.
        failed_keys: set[bytes] = set()
        sent_alone: set[int] = set()

        def on_delivery(row_id: int):
            # Runs inside poll()/flush() on this thread (confluent-kafka-python #417): no
            # locking, no poll() in here (#457). Store first: after a fatal error this runs
            # with an exception set, and any call could raise (see _serve).
            def report(err: KafkaError | None, msg: Message) -> None:
                reports[row_id] = msg
                if err is not None and (key := msg.key()) is not None:
                    failed_keys.add(key)

            return report

        produced = 0

        def produce(message: PendingMessage) -> Failed | None:
            nonlocal produced
            headers: list[tuple[str, str | bytes | None]] = [
                ("message_id", str(message.message_id).encode())
            ]
            if message.headers:
                headers.extend(message.headers)
            while True:
                if self._fatal:
                    return Failed(message.id, FailureKind.UNKNOWN, "producer fatal error")
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
                        self._poll()
                    return None
                except BufferError:
                    # The local queue is full: serve reports to make room, then try again.
                    if time.monotonic() >= deadline:
                        return Failed(message.id, FailureKind.OUTAGE, "producer queue full")
                    self._poll(0.05)
                except KafkaException as exc:
                    err = exc.args[0]
                    return Failed(message.id, classify(err), describe(err), err.fatal())

        def produce_one(message: PendingMessage) -> Failed | None:
            topic = topics[message.topic]
            if topic.problem is not None:
                return Failed(message.id, topic.problem.kind, topic.problem.error)
            if failed_keys and message.key in failed_keys:
                return Failed(
                    message.id, FailureKind.DEFERRED, "an earlier message of its key failed"
                )
            if time.monotonic() >= deadline:
                return Failed(message.id, FailureKind.OUTAGE, "batch deadline passed")
            risky = message.id in alone or (
                topic.max_bytes is not None
                and message_size(message) + RECORD_BATCH_OVERHEAD > topic.max_bytes
            )
            if not risky:
                return produce(message)
            # Alone: everything before it acknowledged first, its own outcome known before
            # the next message is produced.
            if self._serve(deadline - time.monotonic()):
                return Failed(message.id, FailureKind.OUTAGE, "earlier messages unacknowledged")
            sent_alone.add(message.id)
            failure = produce(message)
            if failure is not None:
                return failure
            self._serve(deadline - time.monotonic())
            msg = reports.get(message.id)
            err = msg.error() if msg is not None else None
            if err is not None:
                del reports[message.id]
                return Failed(message.id, classify(err), describe(err), err.fatal())
            return None

        # Failures found before or while producing (missing topic, refused by the producer, a
        # message sent alone, a key with a failure): each is this message's own.
        return send_in_key_order(batch, produce_one), reports, sent_alone

    def _poll(self, timeout: float = 0.0) -> None:
        try:
            self.producer.poll(timeout)
        except (KafkaException, SystemError) as exc:
            self._fatal = True
            log.error("Kafka producer fatal error, it will be replaced: %s", exc)

    @staticmethod
    def _outcomes(batch, early, reports, sent_alone) -> list[Outcome]:
        result: list[Outcome] = []
        for message in batch:
            outcome = early.get(message.id)
            if outcome is None:
                msg = reports.get(message.id)
                if msg is None:
                    outcome = Failed(
                        message.id,
                        FailureKind.UNKNOWN,
                        "no delivery report before the batch deadline",
                    )
                elif msg.error() is None:
                    outcome = Delivered(message.id, msg.partition(), msg.offset())
                else:
                    err = msg.error()
                    kind = classify(err)
                    if (
                        kind in (FailureKind.PERMANENT, FailureKind.TRANSIENT)
                        and message.id not in sent_alone
                    ):
                        # Rejected in a request shared with other messages: which one was at
                        # fault is not known. Nobody's attempt is counted; the relay sends
                        # them alone next time.
                        kind = FailureKind.ISOLATE
                    outcome = Failed(message.id, kind, describe(err), err.fatal())
            result.append(outcome)
        return result


# -- exactly-once delivery: one transactional producer per shard (relay.shards says how the
# pieces fit, docs/design.md why). The error handling follows librdkafka's transactional API
# (rdkafka.h, "Transactional producer API"): a retriable error retries the call, an abortable
# one aborts the transaction, a fatal one (fenced included) ends the producer.

#: What a transactional producer cannot do without. Neither message.timeout.ms=0 nor the gapless
#: guarantee of at-least-once mode: librdkafka wants message.timeout.ms at most the transaction
#: timeout (its default), and a message that fails aborts its whole transaction, so nothing of a
#: key can become visible after an earlier message of it failed.
TRANSACTIONAL_PRODUCER_CONFIG: Mapping[str, str] = {"enable.idempotence": "true", "acks": "all"}

_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
_MESSAGE_FAULTS = {FailureKind.PERMANENT, FailureKind.TRANSIENT, FailureKind.ISOLATE}


class _Transaction(NamedTuple):
    batch: Sequence[PendingMessage]
    early: dict[int, Failed]
    reports: dict[int, Message]
    sent_alone: set[int]
    #: Rows handed to the producer in this transaction.
    produced: list[Named]
    #: Why the transaction must be aborted rather than committed ("" if it may commit).
    abort_reason: str = ""


class _End(NamedTuple):
    """How a transaction ended: committed, aborted, or unknown (the producer is dropped)."""

    state: str
    why: str = ""
    #: What the error that aborted it says of the messages (classify()), if an error did.
    cause: FailureKind | None = None


class ShardProducer(KafkaSink):
    """The transactional producer of one shard: KafkaSink's production in key order, inside a
    transaction that ends with the shard's progress record."""

    required_config = TRANSACTIONAL_PRODUCER_CONFIG

    def __init__(
        self,
        config: Mapping[str, str],
        shard: int,
        *,
        shards: int,
        transactional_id: str,
        transaction_timeout: float,
        progress_topic: str,
        **settings,
    ):
        super().__init__(
            {
                **config,
                "transactional.id": transactional_id,
                "transaction.timeout.ms": str(int(transaction_timeout * 1000)),
            },
            **settings,
        )
        self.shard = shard
        self._shards = shards
        self._progress_topic = progress_topic
        #: Why this producer cannot go on (fenced, fatal, a transaction whose end is unknown);
        #: the shard is then taken again, progress records first, before it sends anything.
        self.broken = ""

    def produce_transaction(
        self,
        batch: Sequence[PendingMessage],
        alone: frozenset[int],
        unconfirmed: Sequence[Named],
        deadline: float,
    ) -> _Transaction:
        """Begin a transaction, produce BATCH in key order, then the progress record: the rows
        produced and the UNCONFIRMED ones of earlier transactions."""
        topics = self._look_up_topics({m.topic for m in batch}, deadline)
        producer = self.producer
        producer.begin_transaction()
        early, reports, sent_alone = self._produce_all(batch, alone, topics, deadline)
        produced = [(m.id, message_tag(m.message_id)) for m in batch if m.id not in early]
        reason = "producer fatal error" if self._fatal else ""
        if produced and not reason:
            try:
                producer.produce(
                    self._progress_topic,
                    value=encode_progress(self._shards, self.shard, [*produced, *unconfirmed]),
                    key=str(self.shard).encode(),
                    partition=self.shard,
                )
            except (BufferError, KafkaException) as exc:
                reason = f"progress record not produced: {exc}"
        return _Transaction(batch, early, reports, sent_alone, produced, reason)

    def finish(self, txn: _Transaction, deadline: float) -> list[Outcome]:
        """Commit TXN (or abort it) and say what became of each of its messages."""
        try:
            if txn.abort_reason or not txn.produced or self._fatal:
                end = self._abort(txn.abort_reason or "nothing to commit")
            else:
                end = self._commit(deadline)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the end is not known
            self.broken = f"{type(exc).__name__}: {exc}"
            end = _End("unknown", self.broken)
        return self._transaction_outcomes(txn, end)

    def _commit(self, deadline: float) -> _End:
        producer = self.producer
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._abort("the batch deadline passed before the commit")
            try:
                producer.commit_transaction(left)
                return _End("committed")
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() in _FENCED or err.fatal():
                    self.broken = describe(err)
                    return _End("unknown", self.broken)
                if err.txn_requires_abort():
                    return self._abort(describe(err), classify(err))
                if not err.retriable():
                    self.broken = describe(err)
                    return _End("unknown", self.broken)
                # Retriable (a timeout, a coordinator moving): commit again, by the deadline.

    def _abort(self, why: str, cause: FailureKind | None = None) -> _End:
        try:
            self.producer.abort_transaction(SEND_MARGIN)
            return _End("aborted", why, cause)
        except KafkaException as exc:
            # Still committing, timed out, or fenced: whether it committed is not known here.
            self.broken = f"{why}; abort failed: {describe(exc.args[0])}"
            return _End("unknown", self.broken)

    def _transaction_outcomes(self, txn: _Transaction, end: _End) -> list[Outcome]:
        state, why = end.state, end.why
        # Each message's own failure: reported by the broker, or found while producing (sent
        # alone, refused by the producer). A failure of the producer's state is not one.
        own: dict[int, Failed] = {f.id: f for f in txn.early.values() if f.kind in _MESSAGE_FAULTS}
        for row_id, msg in txn.reports.items():
            err = msg.error()
            if err is not None and err.code() not in _PURGED:
                kind = classify(err)
                if kind in (FailureKind.PERMANENT, FailureKind.TRANSIENT) and (
                    row_id not in txn.sent_alone
                ):
                    kind = FailureKind.ISOLATE  # as in KafkaSink._outcomes
                own[row_id] = Failed(row_id, kind, describe(err), err.fatal())
        out: list[Outcome] = []
        for message in txn.batch:
            fault = own.get(message.id)
            outcome: Outcome | None = fault
            if state == "committed":
                report = txn.reports.get(message.id)
                if message.id in txn.early:
                    outcome = txn.early[message.id]
                elif fault is not None:
                    # librdkafka lets no transaction with a failed message commit; if it ever
                    # did, the row is named in the committed record: take the shard afresh
                    # (its record read back) before anything else of it is sent.
                    outcome = Failed(message.id, FailureKind.UNKNOWN, fault.error)
                    self.broken = f"row {message.id} failed in a committed transaction"
                elif report is not None:
                    outcome = Delivered(message.id, report.partition(), report.offset())
                else:
                    outcome = Delivered(message.id, None, None)
            elif outcome is not None:
                pass
            elif state == "aborted":
                # Not visible to read_committed consumers. Sent again at once if a message of
                # the transaction was at fault, else after the outage pause. A permanent error
                # that no message carries (the transaction could not add a partition: a topic
                # not writable, say) is charged to a message sent alone, and makes the others
                # go alone next time, as in at least once mode: it must not stall the shard.
                kept = txn.early.get(message.id)
                if kept is not None and kept.kind is FailureKind.DEFERRED:
                    outcome = kept
                elif not own and end.cause is FailureKind.PERMANENT:
                    alone = len(txn.produced) == 1 or message.id in txn.sent_alone
                    outcome = Failed(
                        message.id,
                        FailureKind.PERMANENT if alone else FailureKind.ISOLATE,
                        f"its transaction was aborted: {why}",
                    )
                else:
                    outcome = Failed(
                        message.id,
                        FailureKind.DEFERRED if own else FailureKind.OUTAGE,
                        f"its transaction was aborted: {why}",
                    )
            else:
                outcome = Failed(
                    message.id, FailureKind.UNKNOWN, f"its transaction's end is unknown: {why}"
                )
            out.append(outcome)
        return out


class TransactionalSink:
    """Exactly-once delivery: each shard's rows go in transactions of its own producer, each
    with a progress record, and a shard taken over is first brought up to date from its
    progress records (adopt). Shards' transactions of a batch are committed in parallel."""

    def __init__(
        self,
        config: Mapping[str, str],
        *,
        shards: int,
        progress_topic: str,
        transactional_id_prefix: str,
        flush_timeout: float = 35.0,
        metadata_timeout: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        outage_log: OutageLog | None = None,
        start_timeout: float = 10.0,
    ):
        self._config = dict(config)
        self._shards = shards
        self._progress_topic = progress_topic
        self._prefix = transactional_id_prefix
        self._flush_timeout = flush_timeout
        self._metadata_timeout = metadata_timeout
        self._max_message_bytes = max_message_bytes
        self._start_timeout = start_timeout
        self.outage_log = outage_log or OutageLog(log)
        self.resets = 0
        self._producers: dict[int, ShardProducer] = {}
        #: Rows of committed transactions, by shard, whose CONFIRMED status may not be written
        #: yet: named again in the shard's next progress record ({id: tag}).
        self._committed: dict[int, dict[int, bytes]] = {}
        self._pool = ThreadPoolExecutor(min(shards, 16), thread_name_prefix="outbox-txn")

    @property
    def shards_ready(self) -> frozenset[int]:
        return frozenset(self._producers)

    def _new_producer(self, shard: int) -> ShardProducer:
        return ShardProducer(
            self._config,
            shard,
            shards=self._shards,
            transactional_id=f"{self._prefix}-{shard}",
            transaction_timeout=transaction_timeout(self._flush_timeout),
            progress_topic=self._progress_topic,
            flush_timeout=self._flush_timeout,
            metadata_timeout=self._metadata_timeout,
            max_message_bytes=self._max_message_bytes,
            outage_log=self.outage_log,
        )

    def _drop(self, shard: int) -> None:
        producer = self._producers.pop(shard, None)
        self._committed.pop(shard, None)
        if producer is not None:
            producer.reset()

    # -- taking shards

    def adopt(self, buckets: frozenset[int], lease_lapsed: bool) -> list[Named]:
        owned = whole_shards(buckets, self._shards)
        for shard in list(self._producers):
            if lease_lapsed or shard not in owned:
                self._drop(shard)
        new = sorted(owned - self._producers.keys())
        if not new:
            return []
        candidates = {shard: self._new_producer(shard) for shard in new}
        problems = list(self._pool.map(self._start, candidates.values()))
        started = [s for s, problem in zip(new, problems, strict=True) if problem is None]
        for shard, problem in zip(new, problems, strict=True):
            if problem is not None:
                self.outage_log.problem(
                    f"init {problem}",
                    logging.WARNING,
                    f"shard {shard}: init_transactions failed ({problem}); its rows wait",
                )
        found = self._read_progress(started) if started else {}
        recovered: list[Named] = []
        for shard, producer in candidates.items():
            if shard in found:
                self._producers[shard] = producer
                recovered.extend(found[shard])
            else:
                producer.reset()
        if len(self._producers) < len(owned):
            self.resets += 1  # the relay renews (and adopts) again before its next batch
        log.info(
            "exactly-once: %d shards ready (%d taken now), %d rows named in their progress",
            len(self._producers),
            len(found),
            len(recovered),
        )
        return sorted(recovered)

    def _start(self, producer: ShardProducer) -> str | None:
        """init_transactions: fences the shard's previous producer, ends its open transaction
        (aborted, or waited for if it was committing). None when done, else why not."""
        try:
            producer.producer.init_transactions(self._start_timeout)
            return None
        except KafkaException as exc:
            return describe(exc.args[0])

    def _read_progress(self, shards: list[int]) -> dict[int, list[Named]]:
        """The rows named in the last committed progress record of each of SHARDS ([] for a
        shard with none). A shard whose record cannot be read is left out: it does not send."""
        settings = client_settings(self._config)
        consumer = Consumer(
            {
                **settings,
                "group.id": f"{self._prefix}-progress",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "error_cb": self._on_error,
            },
            logger=self.outage_log,
        )
        found: dict[int, list[Named]] = {}
        deadline = time.monotonic() + self._start_timeout
        try:
            todo: dict[int, tuple[int, int]] = {}
            for shard in shards:
                low, end = consumer.get_watermark_offsets(
                    TopicPartition(self._progress_topic, shard),
                    timeout=max(0.1, deadline - time.monotonic()),
                    cached=False,
                )
                if end <= low:
                    found[shard] = []
                else:
                    todo[shard] = (low, end)
            # The last committed record is near the end: read the last few records, and
            # further back only if aborted transactions hid every one of them.
            window = 64
            while todo and time.monotonic() < deadline:
                starts = {s: max(low, end - window) for s, (low, end) in todo.items()}
                ends = {s: end for s, (_, end) in todo.items()}
                last = self._read_to_end(consumer, starts, ends, deadline)
                for shard, value in last.items():
                    if value is not None:
                        try:
                            found[shard] = decode_progress(value, self._shards, shard)
                        except ProgressError as exc:  # this shard waits; the others go on
                            log.error("shard %d: its last progress record: %s", shard, exc)
                    elif starts[shard] == todo[shard][0]:
                        found[shard] = []
                    else:
                        continue
                    del todo[shard]
                window *= 16
            for shard in todo:
                log.warning("shard %d: its progress records were not read in time", shard)
        except KafkaException as exc:
            log.error("progress topic %s: %s", self._progress_topic, describe(exc.args[0]))
        finally:
            consumer.close()
        return found

    def _read_to_end(
        self, consumer: Consumer, starts: dict[int, int], ends: dict[int, int], deadline: float
    ) -> dict[int, bytes | None]:
        """Read each shard's partition from its start offset to its end (the last stable
        offset: read_committed); the value of the last record read, None if none."""
        consumer.assign([TopicPartition(self._progress_topic, s, o) for s, o in starts.items()])
        last: dict[int, bytes | None] = dict.fromkeys(starts)
        open_ = set(starts)
        while open_ and time.monotonic() < deadline:
            msg = consumer.poll(min(0.5, max(0.0, deadline - time.monotonic())))
            if msg is None:
                continue
            err = msg.error()
            shard = msg.partition() or 0
            if err is not None:
                # The end as the broker answered ListOffsets, not a lagging leader's.
                if err.code() == KafkaError._PARTITION_EOF and (msg.offset() or 0) >= ends[shard]:
                    open_.discard(shard)
                    continue
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            last[shard] = msg.value()
        consumer.unassign()
        return {s: v for s, v in last.items() if s not in open_}

    def _on_error(self, err: KafkaError) -> None:
        report_client_error(self.outage_log, err)

    # -- sending

    def send(
        self,
        batch: Sequence[PendingMessage],
        alone: frozenset[int] = frozenset(),
        unconfirmed: Sequence[int] = (),
    ) -> list[Outcome]:
        try:
            return self._send(batch, alone, unconfirmed)
        except BaseException:
            # An interrupt or a bug: no transaction of this batch may be left to commit later.
            for shard in list(self._producers):
                self._drop(shard)
            self.resets += 1
            raise

    def _send(
        self, batch: Sequence[PendingMessage], alone: frozenset[int], unconfirmed: Sequence[int]
    ) -> list[Outcome]:
        deadline = time.monotonic() + self._flush_timeout
        keep = set(unconfirmed)
        for shard, rows in self._committed.items():
            self._committed[shard] = {i: tag for i, tag in rows.items() if i in keep}
        outcomes: dict[int, Outcome] = {}
        opened: list[tuple[int, ShardProducer, _Transaction]] = []
        for shard, messages in group_by_shard(batch, self._shards).items():
            producer = self._producers.get(shard)
            earlier = self._committed.get(shard, {})
            problem = ""
            if producer is None:
                problem = f"shard {shard} is not ready (it is taken at the next lease renewal)"
            elif len(earlier) + len(messages) > MAX_PROGRESS_IDS:
                problem = f"shard {shard} waits for the database to record earlier deliveries"
            else:
                try:
                    txn = producer.produce_transaction(
                        messages, alone, list(earlier.items()), deadline
                    )
                    opened.append((shard, producer, txn))
                    continue
                except KafkaException as exc:  # begin_transaction refused: not usable
                    producer.broken = problem = describe(exc.args[0])
            for m in messages:
                outcomes[m.id] = Failed(m.id, FailureKind.OUTAGE, problem)
        if len(opened) == 1:
            ends = [opened[0][1].finish(opened[0][2], deadline)]
        else:
            ends = list(self._pool.map(lambda o: o[1].finish(o[2], deadline), opened))
        for (shard, _, txn), results in zip(opened, ends, strict=True):
            tags = dict(txn.produced)
            for outcome in results:
                outcomes[outcome.id] = outcome
                if isinstance(outcome, Delivered):
                    self._committed.setdefault(shard, {})[outcome.id] = tags[outcome.id]
        for shard, producer in list(self._producers.items()):
            if producer.broken:
                log.error(
                    "shard %d: %s; its producer is replaced at the next lease renewal",
                    shard,
                    producer.broken,
                )
                self._drop(shard)
                self.resets += 1
        return [outcomes[m.id] for m in batch]

    def close(self, timeout: float) -> None:
        for shard in list(self._producers):
            self._producers.pop(shard).close(timeout)
        self._committed.clear()
        self._pool.shutdown(wait=False)


def transaction_timeout(flush_timeout: float) -> float:
    """transaction.timeout.ms, in seconds, of exactly-once producers: past a batch's deadline
    and its abort. The coordinator aborts a transaction left open longer (a relay paused
    mid-batch), so that it does not hold back read_committed consumers for long."""
    return flush_timeout + 2 * SEND_MARGIN


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


# -- outbox reconcile: the records at CONFIRMED rows' offsets (relay/reconcile.py decides what
# they mean). One read_committed consumer, a chunk's partitions of a topic at a time, each
# read forward.

#: librdkafka's log lines while reconciling: the failures that matter come back as Unavailable
#: and make the command's one error line; the rest are for an application's own handlers.
_reader_log = logging.getLogger("relay.kafka.reader")
_reader_log.addHandler(logging.NullHandler())  # no "last resort" lines on the CLI's stderr

#: Records to read past rather than seek over: a seek costs a fetch round trip (a few ms),
#: reading a record a few microseconds.
SEEK_GAP = 5000


class KafkaRecordSource:
    """reconcile.RecordSource over Kafka. Each read() is a chunk's offsets of one topic, by
    partition: the consumer is assigned every partition wanted at its first offset, so their
    fetches run together (one partition at a time was 4 times slower: a fetch round trip per
    megabyte, and a start-up per partition), and reads each forward, seeking only over a gap
    wider than SEEK_GAP; a partition done is paused, so that it is not fetched further.

    read_committed: a row confirmed in exactly-once mode is in a committed transaction, and a
    row confirmed at least once is a plain record, visible either way; the offsets of aborted
    records and transaction markers are skipped, and so reported as holding no record.

    Every wait is bounded: a partition that gives nothing for TIMEOUT seconds is marked
    unavailable, and its remaining rows are reported unreadable without waiting again."""

    def __init__(
        self,
        config: Mapping[str, str],
        *,
        timeout: float = 15.0,
        batch: int = 1000,
        seek_gap: int = SEEK_GAP,
    ):
        self._errors: list[str] = []
        self._settings = client_settings(config)
        common = {
            **self._settings,
            # Never joined (assign() only) and nothing committed: a name of its own.
            "group.id": f"outbox-reconcile-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "error_cb": self._on_error,
        }
        self._consumer = new_client(
            Consumer,
            {
                **common,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                # An offset deleted under us is an error, not a silent jump to another offset.
                "auto.offset.reset": "error",
                # Bounds what librdkafka prefetches for each partition assigned.
                "queued.max.messages.kbytes": 16384,
                # A fetch the broker holds open (500 ms by default) delays the first fetch of
                # the next assignment: 0.4 s per partition, measured.
                "fetch.wait.max.ms": 10,
            },
            logger=_reader_log,
        )
        # Watermarks. read_uncommitted: its end of a partition is the high
        # watermark, where a read_committed client's is the last stable offset, short of an
        # open transaction's records, which are there but not decided yet (not missing).
        try:
            self._meta = new_client(
                Consumer, {**common, "isolation.level": "read_uncommitted"}, logger=_reader_log
            )
        except KafkaSettingsError:
            self._consumer.close()
            raise
        self._admin: AdminClient | None = None
        self._timeout = timeout
        self._batch = batch
        self._seek_gap = seek_gap
        self._topics: dict[str, frozenset[int]] = {}
        self._broken: dict[tuple[str, int], str] = {}
        self._paused: list[TopicPartition] = []

    def _on_error(self, err: KafkaError) -> None:
        self._errors.append(describe(err))

    def _why(self, text: str) -> str:
        return f"{text} ({self._errors[-1]})" if self._errors else text

    def check(self, timeout: float) -> str | None:
        """None when a broker answers within TIMEOUT seconds, else why not."""
        try:
            self._consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            return self._why(describe(exc.args[0]))
        return None

    def close(self) -> None:
        self._consumer.close()
        self._meta.close()

    def cleanup_policy(self, topic: str) -> str:
        """TOPIC's cleanup.policy, from DescribeConfigs (the checker asks once a topic, at its
        first offset without a committed record). Raises Unavailable, saying why, when it
        cannot be read."""
        from .reconcile import Unavailable

        try:
            if self._admin is None:
                self._admin = new_client(AdminClient, self._settings, logger=_reader_log)
            resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
            future = self._admin.describe_configs([resource], request_timeout=self._timeout)
            entries = future[resource].result(timeout=self._timeout + SEND_MARGIN)
            return str(entries["cleanup.policy"].value)
        except KafkaException as exc:
            err = exc.args[0]
            why = describe(err) if isinstance(err, KafkaError) else str(err)
            if isinstance(err, KafkaError) and err.code() in (
                KafkaError.TOPIC_AUTHORIZATION_FAILED,
                KafkaError.CLUSTER_AUTHORIZATION_FAILED,
            ):
                why = f"DescribeConfigs on the topic is not allowed ({why})"
        except FutureTimeout:
            why = f"no answer to DescribeConfigs within {self._timeout:g} s"
        except KafkaSettingsError as exc:
            why = str(exc)
        except KeyError:
            why = "DescribeConfigs gave no cleanup.policy"
        raise Unavailable(why)

    def _partitions(self, topic: str) -> frozenset[int]:
        from .reconcile import Absent, Unavailable

        if topic not in self._topics:
            try:
                # Asked by the reading consumer: without a metadata request of its own for the
                # topic, its first fetch after assign() came 0.9 s later (measured).
                md = self._consumer.list_topics(topic, timeout=self._timeout).topics.get(topic)
            except KafkaException as exc:
                raise Unavailable(self._why(f"metadata: {describe(exc.args[0])}")) from None
            if md is None or (
                md.error is not None
                and md.error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)
            ):
                raise Absent(f"no topic {topic!r} in the cluster")
            if md.error is not None:
                raise Unavailable(f"metadata: {describe(md.error)}")
            self._topics[topic] = frozenset(md.partitions)
        return self._topics[topic]

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        from .reconcile import Absent, Unavailable

        partitions = self._partitions(topic)
        if partition not in partitions:
            raise Absent(f"no partition {partition} (topic {topic!r} has {len(partitions)})")
        try:
            low, end = self._meta.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=self._timeout, cached=False
            )
        except KafkaException as exc:
            raise Unavailable(self._why(f"offsets: {describe(exc.args[0])}")) from None
        return low, end

    def _fail(self, topic: str, partition: int, why: str):
        from .reconcile import Unavailable

        self._broken[(topic, partition)] = why
        return Unavailable(why)

    def read(self, topic: str, wanted: Mapping[int, Sequence[int]]):
        from .reconcile import Record, Unavailable

        reading: dict[int, _Reading] = {}
        for partition, offsets in wanted.items():
            why = self._broken.get((topic, partition))
            if why is not None:
                yield partition, -1, Unavailable(why)
            elif offsets:
                reading[partition] = _Reading(offsets)
        if not reading:
            return
        # A pause outlives assign(), and a resume after it stalled the fetches for a second
        # (measured): the partitions paused by the last read are resumed before.
        if self._paused:
            self._consumer.resume(self._paused)
            self._paused = []
        # assign() replaces the assignment: librdkafka drops what it had fetched before.
        self._consumer.assign([TopicPartition(topic, p, r.offsets[0]) for p, r in reading.items()])
        consume, gap, eof = self._consumer.consume, self._seek_gap, KafkaError._PARTITION_EOF
        new = tuple.__new__  # a Record without NamedTuple's Python-level __new__
        heard = time.monotonic()
        while reading:  # bounded: each pass hands out records or moves towards the timeout
            # No more than the records up to the last offsets wanted: consume() waits for as
            # many as it is asked for (or its timeout) at a partition's end.
            want = min(self._batch, sum(r.offsets[-1] + 1 - r.next for r in reading.values()))
            try:
                batch = consume(max(1, want), timeout=0.2)
            except KafkaException as exc:
                why = describe(exc.args[0])
                for partition in list(reading):
                    yield partition, -1, self._fail(topic, partition, why)
                return
            if not batch:
                if time.monotonic() - heard > self._timeout:
                    for partition in list(reading):
                        why = f"no answer from {topic} [{partition}] within {self._timeout:g} s"
                        yield partition, -1, self._fail(topic, partition, self._why(why))
                    return
                continue
            heard = time.monotonic()
            for msg in batch:
                # None for a client-wide event: no partition read is None.
                partition = msg.partition()  # type: ignore[assignment]
                r = reading.get(partition)
                if r is None:
                    # A partition done. The assignment holds this topic only, and librdkafka
                    # drops what it fetched for an earlier assign() or seek (no topic()
                    # call a record: 0.1 us each).
                    continue
                err = msg.error()
                if err is not None and err.code() != eof:
                    del reading[partition]
                    yield partition, -1, self._fail(topic, partition, describe(err))
                    continue
                offset = msg.offset() or 0
                if offset < r.next:
                    continue  # fetched before an assign() or a seek
                offsets, i, n = r.offsets, r.i, r.n
                if err is not None:
                    # The end of what a read_committed reader sees: offsets before it that did
                    # not come hold no committed record; those at or after it are in a
                    # transaction not decided yet.
                    while i < n and offsets[i] < offset:
                        yield partition, offsets[i], None
                        i += 1
                    r.i = i
                    del reading[partition]
                    if i < n:  # and so are the partition's later rows: no wait for them
                        why = (
                            f"beyond the last stable offset ({offset}): in a Kafka "
                            "transaction not committed yet"
                        )
                        yield partition, -1, self._fail(topic, partition, why)
                    continue
                r.next = offset + 1
                while i < n and offsets[i] < offset:
                    yield partition, offsets[i], None
                    i += 1
                if i < n and offsets[i] == offset:
                    # Record.of, inlined: this runs once a row. Header values are bytes as
                    # consumed (the typing also allows the str a producer may give).
                    message_id: bytes | None = None
                    for name, found in msg.headers() or ():  # type: ignore[str-unpack]
                        if name == "message_id":
                            message_id = found  # type: ignore[assignment]
                            break
                    value = msg.value()
                    digest = sha256(value).digest() if value is not None else b""
                    yield partition, offset, new(Record, (message_id, msg.key(), digest))
                    i += 1
                r.i = i
                if i == n:  # no further fetches of it: they would be thrown away
                    del reading[partition]
                    done = [TopicPartition(topic, partition)]
                    self._consumer.pause(done)
                    self._paused += done
                elif offsets[i] - r.next > gap:
                    try:
                        self._consumer.seek(TopicPartition(topic, partition, offsets[i]))
                    except KafkaException:
                        continue  # not fetching yet (assign() is asynchronous): read on
                    r.next = offsets[i]
            # Silence counts from here: while the checker held this generator (it may have
            # asked for a topic's cleanup.policy meanwhile), no partition was waited for.
            heard = time.monotonic()


class _Reading:
    """One partition of a read: the offsets wanted, the next of them, and the offset after the
    last record seen (records below it are stale: fetched before an assign() or a seek)."""

    __slots__ = ("i", "n", "next", "offsets")

    def __init__(self, offsets: Sequence[int]):
        self.offsets, self.i, self.n, self.next = offsets, 0, len(offsets), offsets[0]


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
