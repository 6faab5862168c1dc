"""Stand-ins for a confluent-kafka consumer and a psycopg connection, enough to run
InboxConsumer without services. They share one event log, so that tests can check the order
of commits and stored offsets."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from types import SimpleNamespace

import psycopg
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from psycopg import pq


@dataclass
class FakeMessage:
    """The part of confluent_kafka.Message the inbox reads."""

    _topic: str
    _partition: int
    _offset: int
    _headers: list | None = None
    _value: bytes = b""
    _error: KafkaError | None = None

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def headers(self):
        return self._headers

    def value(self):
        return self._value

    def key(self):
        return None

    def error(self):
        return self._error


def message(
    topic: str,
    partition: int,
    offset: int,
    message_id: uuid.UUID | None = None,
    value: bytes = b"",
    headers: list | None = None,
) -> FakeMessage:
    if headers is None:
        headers = [("message_id", str(message_id or uuid.uuid4()).encode())]
    return FakeMessage(topic, partition, offset, headers, value)


class FakeConsumer:
    """A consumer of a fixed log per partition: poll() hands out each partition's next record
    (partitions in sorted order); seek() moves a partition's position; store_offsets() keeps
    the next offset to commit, and close() "commits" the stored offsets."""

    def __init__(self, records: list[FakeMessage], events: list | None = None):
        self.logs: dict[tuple[str, int], dict[int, FakeMessage]] = {}
        for r in records:
            self.logs.setdefault((r.topic(), r.partition()), {})[r.offset()] = r
        self.position = {tp: min(log) for tp, log in self.logs.items()}
        self.stored: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.events = events if events is not None else []
        self.errors: list[KafkaError] = []
        self.subscribed: list[str] = []
        self.seeks: list[tuple[str, int, int]] = []
        self.polls = 0
        self.closed = False
        self.store_fails = False
        self.seek_fails = False
        self.revoked: set[tuple[str, int]] = set()
        self.on_poll = None

    def subscribe(self, topics):
        self.subscribed = list(topics)

    def poll(self, timeout=None):
        self.polls += 1
        if self.on_poll:
            self.on_poll(timeout)
        if self.errors:
            return FakeMessage("", -1, -1, None, b"", self.errors.pop(0))
        for tp in sorted(self.logs):
            pos = self.position[tp]
            if pos in self.logs[tp]:
                self.position[tp] = pos + 1
                return self.logs[tp][pos]
        return None

    def assignment(self):
        return [TopicPartition(t, p) for t, p in sorted(self.logs) if (t, p) not in self.revoked]

    def seek(self, tp):
        if self.seek_fails:
            raise KafkaException(KafkaError(KafkaError._STATE, "seek failed"))
        self.seeks.append((tp.topic, tp.partition, tp.offset))
        self.position[(tp.topic, tp.partition)] = tp.offset

    def store_offsets(self, message=None):
        if self.store_fails:
            raise KafkaException(KafkaError(KafkaError._STATE, "partition not assigned"))
        tp = (message.topic(), message.partition())
        self.stored[tp] = message.offset() + 1
        self.events.append(("store", message.topic(), message.partition(), message.offset()))

    def close(self):
        self.closed = True
        self.committed = dict(self.stored)


class FakeConnection:
    """A psycopg connection as the inbox uses it: transaction blocks, the inbox INSERT (its
    rows keyed by group and message_id, visible once committed), and handler side effects
    that commit or roll back with the transaction."""

    def __init__(self, events: list | None = None, autocommit: bool = False):
        self.autocommit = autocommit
        self.closed = False
        self.broken = False
        self.status = pq.TransactionStatus.IDLE
        self.inbox: dict[tuple[str, uuid.UUID], tuple] = {}
        self.effects: list = []
        self._pending_inbox: dict = {}
        self._pending_effects: list = []
        self.events = events if events is not None else []
        self.fail_executes = 0

    @property
    def info(self):
        return SimpleNamespace(transaction_status=self.status)

    @contextlib.contextmanager
    def transaction(self):
        assert self.status == pq.TransactionStatus.IDLE, "the fake does no savepoints"
        self.status = pq.TransactionStatus.INTRANS
        try:
            yield
        except BaseException:
            self._end(commit=False)
            raise
        # COMMIT of a failed transaction rolls back, without an error, as PostgreSQL does.
        self._end(commit=self.status == pq.TransactionStatus.INTRANS)

    def _end(self, commit: bool) -> None:
        if commit:
            self.inbox.update(self._pending_inbox)
            self.effects.extend(self._pending_effects)
            self.events.append(("commit", list(self._pending_inbox)))
        else:
            self.events.append(("rollback",))
        self._pending_inbox, self._pending_effects = {}, []
        self.status = pq.TransactionStatus.IDLE

    def execute(self, query, params=None):
        if self.closed:
            raise psycopg.OperationalError("the connection is closed")
        if self.fail_executes:
            self.fail_executes -= 1
            self.closed = self.broken = True
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        if self.status == pq.TransactionStatus.INERROR:
            raise psycopg.errors.InFailedSqlTransaction("current transaction is aborted")
        pair = (params["group"], params["message_id"])
        if pair in self.inbox or pair in self._pending_inbox:
            return SimpleNamespace(description=[("?column?",)], fetchall=lambda: [])
        self._pending_inbox[pair] = (params["topic"], params["partition"], params["offset"])
        return SimpleNamespace(description=[("?column?",)], fetchall=lambda: [(1,)])

    def effect(self, value) -> None:
        """A write of the handler's, committed with the transaction."""
        assert self.status != pq.TransactionStatus.IDLE, "a side effect outside a transaction"
        self._pending_effects.append(value)

    def fail(self) -> None:
        """A statement of the handler's failed (and the handler caught the error)."""
        self.status = pq.TransactionStatus.INERROR

    def close(self) -> None:
        self.closed = True
