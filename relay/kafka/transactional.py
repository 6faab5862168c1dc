"""Exactly-once delivery: one transactional producer per shard (relay.shards says how the
pieces fit, docs/design.md why). The error handling follows librdkafka's transactional API
(rdkafka.h, "Transactional producer API"): a retriable error retries the call, an abortable
one aborts the transaction, a fatal one (fenced included) ends the producer."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from outbox.message import DEFAULT_MAX_MESSAGE_BYTES

from ..model import SEND_MARGIN, Delivered, Failed, FailureKind, Outcome, PendingMessage
from ..outage_log import OutageLog
from ..shards import (
    MAX_PROGRESS_IDS,
    Named,
    ProgressError,
    decode_progress,
    encode_progress,
    group_by_shard,
    message_tag,
    whole_shards,
)
from .client import classify, client_settings, describe, report_client_error
from .sink import KafkaSink

#: One logger for the package, not one per module: the relay's outage log (runner.py), log filters
#: and the JSON lines' "logger" field know it as relay.kafka.
log = logging.getLogger("relay.kafka")

#: What a transactional producer cannot do without. Neither message.timeout.ms=0 nor the gapless
#: guarantee of at-least-once mode: librdkafka wants message.timeout.ms at most the transaction
#: timeout (its default), and a message that fails aborts its whole transaction, so nothing of a
#: key can become visible after an earlier message of it failed.
TRANSACTIONAL_PRODUCER_CONFIG: Mapping[str, str] = {"enable.idempotence": "true", "acks": "all"}

_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
_MESSAGE_FAULTS = {FailureKind.PERMANENT, FailureKind.TRANSIENT, FailureKind.ISOLATE}


class Transaction(NamedTuple):
    """A shard's transaction, produced and not ended yet: its batch, what is known so far of
    its messages, and the rows its progress record names."""

    batch: Sequence[PendingMessage]
    early: dict[int, Failed]
    reports: dict[int, Message]
    sent_alone: set[int]
    #: Rows handed to the producer in this transaction.
    produced: list[Named]
    #: Why the transaction must be aborted rather than committed ("" if it may commit).
    abort_reason: str = ""


class TransactionEnd(NamedTuple):
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
    ) -> Transaction:
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
        return Transaction(batch, early, reports, sent_alone, produced, reason)

    def finish(self, txn: Transaction, deadline: float) -> list[Outcome]:
        """Commit TXN (or abort it) and say what became of each of its messages."""
        try:
            if txn.abort_reason or not txn.produced or self._fatal:
                end = self._abort(txn.abort_reason or "nothing to commit")
            else:
                end = self._commit(deadline)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the end is not known
            self.broken = f"{type(exc).__name__}: {exc}"
            end = TransactionEnd("unknown", self.broken)
        outcomes, broken = transaction_outcomes(txn, end)
        if broken:
            self.broken = broken
        return outcomes

    def _commit(self, deadline: float) -> TransactionEnd:
        producer = self.producer
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._abort("the batch deadline passed before the commit")
            try:
                producer.commit_transaction(left)
                return TransactionEnd("committed")
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() in _FENCED or err.fatal():
                    self.broken = describe(err)
                    return TransactionEnd("unknown", self.broken)
                if err.txn_requires_abort():
                    return self._abort(describe(err), classify(err))
                if not err.retriable():
                    self.broken = describe(err)
                    return TransactionEnd("unknown", self.broken)
                # Retriable (a timeout, a coordinator moving): commit again, by the deadline.

    def _abort(self, why: str, cause: FailureKind | None = None) -> TransactionEnd:
        try:
            self.producer.abort_transaction(SEND_MARGIN)
            return TransactionEnd("aborted", why, cause)
        except KafkaException as exc:
            # Still committing, timed out, or fenced: whether it committed is not known here.
            self.broken = f"{why}; abort failed: {describe(exc.args[0])}"
            return TransactionEnd("unknown", self.broken)


def transaction_outcomes(txn: Transaction, end: TransactionEnd) -> tuple[list[Outcome], str]:
    """What became of each message of TXN, ended as END says (ShardProducer.finish), in
    the batch's order; and why the shard's producer cannot go on ("" if it can): a row
    that failed in a committed transaction. No I/O: a function of the two alone."""
    broken = ""
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
                broken = f"row {message.id} failed in a committed transaction"
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
    return out, broken


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
        opened: list[tuple[int, ShardProducer, Transaction]] = []
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
