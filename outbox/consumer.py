"""InboxConsumer: a confluent-kafka consumer loop that runs a handler once per message and
consumer group, with the inbox (outbox.inbox) in the handler's own transaction.

For each record, in partition order:

1. one database transaction: record (group, message_id) in inbox_message; if that row is
   new, run handler(conn, record) on the same connection; commit. A message the group
   processed before commits nothing and its handler does not run.
2. after the commit, and only then, store the record's offset. librdkafka's auto commit sends
   the stored offsets to Kafka (every auto.commit.interval.ms, on a rebalance, at close()).

A process that dies before the commit leaves nothing, and the record comes again; one that
dies after it leaves the inbox row, and the record comes again (its offset was not stored, or
not yet committed) and is skipped. Either way the handler's writes commit once.

A failing handler (or database) is retried on the same record with capped exponential
backoff; after max_attempts the consumer seeks the partition back to the record and raises
HandlerFailed, so the record is the next one consumed, by this consumer or the partition's
next owner. The offsets of later records are never stored before it: storing offset 7 after
record 5 failed would commit past 5 and lose it.

This is the only module of the package that imports confluent_kafka; applications that only
publish never load it.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from psycopg import pq

from . import inbox
from .errors import HandlerFailed, InboxError
from .inbox import MessageIdOf

log = logging.getLogger("outbox.inbox")

Handler = Callable[[psycopg.Connection, Message], None]

#: librdkafka's default max.poll.interval.ms.
DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
#: Seconds between two logs of the same kind of Kafka error.
ERROR_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class Handled:
    """A record the consumer is done with, its offset stored."""

    topic: str
    partition: int
    offset: int
    message_id: uuid.UUID
    #: True: the handler ran and its writes committed. False: the group had processed this
    #: message before (a copy delivered again); nothing was written.
    new: bool


class InboxConsumer:
    """Consume TOPICS and run HANDLER(conn, record) once per message for the consumer group.

    CONFIG is the confluent_kafka.Consumer configuration (bootstrap.servers, group.id, ...).
    The consumer stores each offset itself, after the database commit, and relies on auto
    commit to send stored offsets to Kafka: it sets enable.auto.offset.store=false and refuses
    enable.auto.offset.store=true or enable.auto.commit=false.

    The handler runs inside the consumer's transaction on CONN (a psycopg Connection kept
    for the consumer's use, idle between records), or on a connection made by CONNECT (a
    function returning one, called again after the connection broke). It must not commit;
    an exception rolls its writes and the inbox row back.

    GROUP names the consumer group in the inbox (default: group.id). MESSAGE_ID, if given,
    gives the id of a record (for producers that set no message_id header). RETENTION, if
    given, deletes the group's inbox rows older than that every RETENTION_INTERVAL seconds,
    a few batches at a time between records.

    CONSUMER, instead of CONFIG, is a consumer made elsewhere (tests pass a fake); WAIT(seconds)
    waits for a backoff and returns True if stop() was called meanwhile; CLOCK is monotonic time.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None,
        topics: Sequence[str],
        handler: Handler,
        *,
        conn: psycopg.Connection | None = None,
        connect: Callable[[], psycopg.Connection] | None = None,
        group: str | None = None,
        message_id: MessageIdOf | None = None,
        schema: str | None = None,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        retention: dt.timedelta | None = None,
        retention_interval: float = 300.0,
        consumer: Any = None,
        wait: Callable[[float], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if (conn is None) == (connect is None):
            raise TypeError(
                "pass exactly one of conn= (a connection) and connect= (a function that makes one)"
            )
        if max_attempts < 1 or backoff < 0 or max_backoff < backoff:
            raise ValueError("need max_attempts >= 1 and 0 <= backoff <= max_backoff")
        if retention is not None and retention <= dt.timedelta(0):
            raise ValueError(f"retention must be a positive timedelta, not {retention!r}")
        if retention_interval <= 0:
            raise ValueError(f"retention_interval must be positive, not {retention_interval!r}")
        if isinstance(topics, str) or not topics:
            raise TypeError("topics must be a non-empty list of topic names")
        settings = dict(config or {})
        group = group if group is not None else settings.get("group.id")
        if group is None:
            raise InboxError("no consumer group: set group.id in the config (or group=)")
        inbox.check_group(group)
        self._group = group
        self._handler = handler
        self._message_id = message_id
        self._schema = schema
        self._max_attempts = max_attempts
        self._backoff, self._max_backoff = backoff, max_backoff
        self._retention = retention
        self._retention_interval = retention_interval
        self._clock = clock
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._conn = conn
        self._connect = connect
        self._error_logged: dict[int, float] = {}
        self._next_purge = clock()
        self._closed = False
        if consumer is None:
            settings = consumer_settings(settings)
            check_poll_interval(settings, self.backoff_delays())
            consumer = Consumer(settings)
        self._consumer = consumer
        self._consumer.subscribe(list(topics))

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        *,
        max_messages: int | None = None,
        timeout: float | None = None,
        poll_timeout: float = 1.0,
    ) -> int:
        """Consume until stop() is called, MAX_MESSAGES records were handled or TIMEOUT
        seconds passed (None: no limit); return how many records were handled. Raises
        HandlerFailed when a record's attempts are used up, InboxError for a record that has
        no valid message id; the record is then the next one consumed."""
        deadline = None if timeout is None else self._clock() + timeout
        handled = 0
        while not self._stop.is_set():
            if max_messages is not None and handled >= max_messages:
                break
            wait = poll_timeout
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0:
                    break
                wait = min(wait, left)
            self._purge_if_due()
            if self.poll_once(wait) is not None:
                handled += 1
        return handled

    def poll_once(self, timeout: float = 1.0) -> Handled | None:
        """Wait up to TIMEOUT seconds for one record and handle it. None when none came (or
        stop() was called while its handler was waiting to be retried: the record comes
        again)."""
        msg = self._consumer.poll(timeout)
        if msg is None:
            return None
        if msg.error() is not None:
            self._kafka_error(msg.error())
            return None
        return self.handle(msg)

    def handle(self, msg: Message) -> Handled | None:
        """Run one record through the inbox and the handler, retrying failures; store its
        offset once its transaction committed."""
        try:
            entry = inbox.inbox_entry(self._group, msg, self._message_id)
        except InboxError:
            # Bad input: nothing recorded, offset not stored, and the record stays next.
            self._rewind(msg)
            raise
        attempt = 0
        while True:
            attempt += 1
            try:
                new = self._process(entry, msg)
                break
            except Exception as exc:
                if attempt >= self._max_attempts:
                    self._rewind(msg)
                    raise HandlerFailed(
                        f"{inbox.describe(msg)} (message_id {entry.message_id}) failed "
                        f"{attempt} time(s), the last with {type(exc).__name__}: {exc}; "
                        "nothing was recorded and its offset was not stored: it is the next "
                        "record consumed",
                        **inbox.coordinates(msg),
                    ) from exc
                delay = self.backoff_delays()[attempt - 1]
                log.warning(
                    "%s (message_id %s): attempt %d of %d failed (%s: %s); again in %.1fs",
                    inbox.describe(msg),
                    entry.message_id,
                    attempt,
                    self._max_attempts,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                if self._wait(delay):
                    log.info(
                        "%s: stopping before its next attempt; it comes again", inbox.describe(msg)
                    )
                    self._rewind(msg)
                    return None
            except BaseException:
                self._rewind(msg)
                raise
        self._store(msg)
        return Handled(*_where(msg), entry.message_id, new)

    def _process(self, entry: inbox.InboxEntry, msg: Message) -> bool:
        """One attempt: the inbox row and the handler's writes in one transaction."""
        conn = self._connection()
        try:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                # A transaction left open would turn ours into a savepoint, committed by
                # nobody before the offset is stored.
                raise InboxError(
                    "the consumer's connection has a transaction open: it must "
                    "be idle between records (its own commit is what makes a "
                    "record done)"
                )
            with conn.transaction():
                new = inbox.record_entry(conn, entry, schema=self._schema)
                if new:
                    self._handler(conn, msg)
                    if conn.info.transaction_status == pq.TransactionStatus.INERROR:
                        # The handler caught a database error and went on. COMMIT of a failed
                        # transaction rolls back without an error: the record would look done.
                        raise InboxError(
                            "the handler left the transaction failed (a database "
                            "error it caught?): rolled back"
                        )
            return new
        except BaseException:
            self._drop_broken(conn)
            raise

    # ------------------------------------------------------------------ offsets

    def _store(self, msg: Message) -> None:
        try:
            self._consumer.store_offsets(message=msg)
        except KafkaException as exc:
            # The partition was taken away meanwhile (a rebalance): its next owner starts from
            # the last committed offset, gets this record again and skips it.
            log.warning(
                "%s: offset not stored (%s); the record comes again and is skipped",
                inbox.describe(msg),
                exc.args[0] if exc.args else exc,
            )

    def _rewind(self, msg: Message) -> None:
        """Put the partition back to MSG, so that it is the next record consumed and no later
        record's offset can be stored before it is done."""
        topic, partition, offset = _where(msg)
        try:
            self._consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            reason = exc.args[0] if exc.args else exc
            still_ours = any(
                (tp.topic, tp.partition) == (topic, partition) for tp in self._consumer.assignment()
            )
            if still_ours:
                # The next poll would hand out the records after MSG, and storing their
                # offsets would commit past it: stop instead (nothing after MSG is stored).
                self.stop()
                raise InboxError(
                    f"{inbox.describe(msg)}: could not rewind its partition ({reason}); "
                    "stopping so that no offset past it is stored",
                    topic=topic,
                    partition=partition,
                    offset=offset,
                ) from exc
            # Not assigned any more: its next owner starts at or before it.
            log.info("%s: not rewound (%s)", inbox.describe(msg), reason)

    def _kafka_error(self, error: KafkaError) -> None:
        if error.fatal():
            raise KafkaException(error)
        if error.code() == KafkaError._PARTITION_EOF:
            return
        now = self._clock()
        if now - self._error_logged.get(error.code(), -ERROR_LOG_INTERVAL) >= ERROR_LOG_INTERVAL:
            self._error_logged[error.code()] = now
            log.warning("Kafka: %s (librdkafka retries; logged once a minute)", error.str())

    # ------------------------------------------------------------------ database

    def _connection(self) -> psycopg.Connection:
        if self._conn is None:
            self._conn = self._connect()  # type: ignore[misc]
        return self._conn

    def _drop_broken(self, conn: psycopg.Connection) -> None:
        """Forget a broken connection made by connect(), so the next attempt makes another."""
        if self._connect is not None and (conn.closed or conn.broken):
            try:
                conn.close()
            finally:
                self._conn = None

    def _purge_if_due(self) -> None:
        if self._retention is None or self._clock() < self._next_purge:
            return
        self._next_purge = self._clock() + self._retention_interval
        try:
            deleted = inbox.purge_inbox(
                self._connection(),
                self._retention,
                group=self._group,
                max_batches=10,
                schema=self._schema,
            )
        except (psycopg.Error, InboxError) as exc:
            if self._conn is not None:
                self._drop_broken(self._conn)
            log.warning(
                "inbox retention failed (%s: %s); again in %.0fs",
                type(exc).__name__,
                exc,
                self._retention_interval,
            )
            return
        if deleted:
            log.info("inbox retention: %d rows of group %r deleted", deleted, self._group)

    # ------------------------------------------------------------------ life cycle

    def backoff_delays(self) -> list[float]:
        """The waits between the attempts at one record: doubling from backoff, capped."""
        return [min(self._max_backoff, self._backoff * 2**i) for i in range(self._max_attempts - 1)]

    def stop(self) -> None:
        """Make run() return after the current record (from a signal handler or a thread)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """stop() was called: for loops of poll_once() of one's own."""
        return self._stop.is_set()

    def close(self) -> None:
        """Leave the group, committing the stored offsets; close a connection made by
        connect()."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        finally:
            if self._connect is not None and self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> InboxConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def consumer_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """CONFIG for an inbox consumer: offsets stored by us after each commit, committed by
    librdkafka's auto commit. Refuses settings that would commit an offset before the record's
    transaction did, or never commit one."""
    settings = dict(config)
    if _flag(settings.get("enable.auto.offset.store", False)):
        raise InboxError(
            "enable.auto.offset.store=true would store an offset when a record is "
            "handed out, before its transaction committed: a crash then loses it. "
            "InboxConsumer stores each offset itself, after the commit"
        )
    if not _flag(settings.get("enable.auto.commit", True)):
        raise InboxError(
            "enable.auto.commit=false: InboxConsumer relies on auto commit to send "
            "the offsets it stores to Kafka. To commit yourself, call "
            "outbox.inbox.record() in a loop of your own"
        )
    settings["enable.auto.offset.store"] = False
    return settings


def check_poll_interval(settings: Mapping[str, Any], delays: Sequence[float]) -> None:
    """The retries of one record happen between two polls: their waits must end well within
    max.poll.interval.ms, or the consumer is put out of its group while it waits."""
    limit = float(settings.get("max.poll.interval.ms", DEFAULT_MAX_POLL_INTERVAL_MS)) / 1000
    if sum(delays) >= limit / 2:
        raise InboxError(
            f"the backoff waits of one record add up to {sum(delays):g}s, over "
            f"half of max.poll.interval.ms ({limit:g}s): lower max_attempts or "
            "max_backoff, or raise max.poll.interval.ms"
        )


def _flag(value: Any) -> bool:
    """A librdkafka boolean setting: a bool, or the words it accepts for true."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "t", "1", "yes", "y", "on")


def _where(msg: Message) -> tuple[str, int, int]:
    """A consumed record's topic, partition and offset (None only on error events, which
    never reach the inbox)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
