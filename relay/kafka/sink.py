"""KafkaSink: at-least-once delivery, the Kafka sink of the relay.

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
from collections.abc import Mapping, Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from outbox.message import DEFAULT_MAX_MESSAGE_BYTES, RECORD_BATCH_OVERHEAD, TENANT_HEADER

from ..model import (
    TOPIC_ERROR_TTL,
    Delivered,
    Failed,
    FailureKind,
    Outcome,
    PendingMessage,
    send_in_key_order,
)
from ..outage_log import OutageLog
from ..shards import Named
from .client import (
    PERMANENT_ERRORS,
    classify,
    client_settings,
    describe,
    message_size,
    report_client_error,
)

#: One logger for the package, not one per module: the relay's outage log (runner.py), log filters
#: and the JSON lines' "logger" field know it as relay.kafka.
log = logging.getLogger("relay.kafka")

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

#: Longest single flush() call while serving reports (see KafkaSink._serve).
_SERVE_SLICE = 0.2


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
        read_topic_limits: bool = True,
    ):
        self._config = {
            **DEFAULT_PRODUCER_CONFIG,
            **config,
            **self.required_config,
            "message.max.bytes": str(max_message_bytes),
        }
        self._flush_timeout = flush_timeout
        self._metadata_timeout = metadata_timeout
        #: Whether each topic's max.message.bytes is read (DescribeConfigs), so that a message
        #: over it is sent alone. False: as when DescribeConfigs is not allowed, no message is
        #: known to be too large before the broker rejects it.
        self._read_topic_limits = read_topic_limits
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
            if md is None or (err is not None and err.code() in PERMANENT_ERRORS):
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
        limits = (
            self._max_message_bytes(healthy, end) if healthy and self._read_topic_limits else {}
        )
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
            if message.tenant:
                headers.append((TENANT_HEADER, message.tenant.encode()))
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
