"""The consumers' inbox: record that a consumer group processed a message, in the same
transaction as the handler's own writes, so that a message delivered again is skipped.

    with conn.transaction():
        if outbox.inbox.record(conn, "ledger", msg):    # False: processed before
            apply(conn, msg)                              # the handler's writes
    consumer.store_offsets(message=msg)                   # only after the commit

Kafka delivers each event at least once (docs/guarantees.md); with the inbox, its database
side effects commit once per consumer group. A message is known by its `message_id` header,
which the relay sets on every message. outbox.consumer.InboxConsumer runs this loop for
confluent-kafka; purge_inbox() deletes rows older than the retention window.

record() only writes the row; like publish(), it never commits and refuses a connection where
the row would commit on its own. One flow (record_flow, a generator of queries) serves psycopg
sync and async connections and SQLAlchemy sessions.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg import pq

from . import writer as _writer
from .errors import InboxError
from .sql import one_row

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session

#: The Kafka header that carries a message's id (the relay sets it from local_message).
MESSAGE_ID_HEADER = "message_id"

#: Rows deleted per transaction by purge_inbox().
PURGE_BATCH = 1000

_SQL = "inbox.sql"


class Record(Protocol):
    """What the inbox reads from a consumed record: confluent_kafka.Message has all of it."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    # As confluent_kafka's stub has it; a consumed record's headers are a list of pairs.
    def headers(
        self,
    ) -> list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None: ...


#: Gives a record's message id, for records of producers that set no message_id header.
MessageIdOf = Callable[[Any], uuid.UUID | str]


@dataclass(frozen=True)
class InboxEntry:
    """One inbox row: GROUP processed MESSAGE_ID, read at TOPIC/PARTITION/OFFSET."""

    group: str
    message_id: uuid.UUID
    topic: str | None
    partition: int | None
    offset: int | None


def record(
    conn: psycopg.Connection,
    group: str,
    record: Record,
    *,
    message_id: MessageIdOf | None = None,
    schema: str | None = None,
) -> bool:
    """Record in CONN's current transaction that GROUP processed RECORD. True the first time:
    run the handler in the same transaction. False when the group processed it before: skip
    the handler. Never commits.

    MESSAGE_ID, if given, returns the record's id (a UUID, or text that is one) instead of its
    message_id header. A record without a valid id raises InboxError, naming the record;
    nothing is written."""
    return record_entry(conn, inbox_entry(group, record, message_id), schema=schema)


def record_entry(conn: psycopg.Connection, entry: InboxEntry, *, schema: str | None = None) -> bool:
    """record() for an entry already read from its record (inbox_entry())."""
    return _writer._run_sync(conn, record_flow(entry), schema, "inbox")


async def arecord(
    conn: psycopg.AsyncConnection,
    group: str,
    record: Record,
    *,
    message_id: MessageIdOf | None = None,
    schema: str | None = None,
) -> bool:
    """record() for an AsyncConnection."""
    entry = inbox_entry(group, record, message_id)
    return await _writer._run_async(conn, record_flow(entry), schema, "inbox")


def record_in_session(
    session_or_connection: Session | Connection,
    group: str,
    record: Record,
    *,
    message_id: MessageIdOf | None = None,
    schema: str | None = None,
) -> bool:
    """record() in a SQLAlchemy Session's (or Core Connection's) current transaction, on its
    own DBAPI connection (the psycopg 3 driver, as outbox.sqlalchemy needs)."""
    # SQLAlchemy is loaded by those who use it only, as with outbox.sqlalchemy itself.
    from .sqlalchemy import _connection, _run

    entry = inbox_entry(group, record, message_id)
    return _run(_connection(session_or_connection), record_flow(entry), schema, "inbox")


async def arecord_in_session(
    session_or_connection: AsyncSession | AsyncConnection,
    group: str,
    record: Record,
    **kwargs: Any,
) -> bool:
    """record_in_session() for an AsyncSession or AsyncConnection."""
    return await session_or_connection.run_sync(
        lambda s: record_in_session(s, group, record, **kwargs)
    )


def purge_inbox(
    conn: psycopg.Connection,
    older_than: dt.timedelta,
    *,
    group: str | None = None,
    batch_size: int = PURGE_BATCH,
    max_batches: int | None = None,
    schema: str | None = None,
    on_batch: Callable[[psycopg.Connection, int], None] | None = None,
) -> int:
    """Delete the inbox rows processed more than OLDER_THAN ago (of GROUP only, if given), in
    transactions of BATCH_SIZE rows, at most MAX_BATCHES of them; return how many.

    A message delivered again after its row was deleted is processed again: keep OLDER_THAN
    above the longest time a message can take to come again (docs/consuming.md). Runs its own
    short transactions, so CONN must not be inside one. ON_BATCH(conn, deleted) is called
    inside each batch's transaction after its DELETE (`outbox inbox purge` writes its audit
    entry there, so a batch and its entry commit together)."""
    if not isinstance(older_than, dt.timedelta) or older_than <= dt.timedelta(0):
        raise ValueError(f"older_than must be a positive timedelta, not {older_than!r}")
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError("batch_size and max_batches must be at least 1")
    if group is not None:
        check_group(group)
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise InboxError(
            "purge_inbox() deletes in short transactions of its own: call it outside a "
            "transaction (commit or roll back first)"
        )
    with conn.transaction():
        (cutoff,) = one_row(
            conn.execute(
                _writer.statement("purge_cutoff", schema, _SQL), {"older_than": older_than}
            )
        )
    turn = _writer.statement("purge_turn", schema, _SQL)
    name = "purge_batch" if group is None else "purge_group_batch"
    query = _writer.statement(name, schema, _SQL)
    deleted = batches = 0
    # Bounded: the cutoff is fixed before the first batch and rows get processed_at = now(),
    # so every batch but the last deletes batch_size rows of a set that only shrinks.
    while max_batches is None or batches < max_batches:
        with conn.transaction():
            conn.execute(turn)
            n = conn.execute(
                query, {"cutoff": cutoff, "group": group, "limit": batch_size}
            ).rowcount
            if on_batch is not None:
                on_batch(conn, n)
        deleted += n
        batches += 1
        if n < batch_size:
            break
    return deleted


def count_old(
    conn: psycopg.Connection,
    older_than: dt.timedelta,
    *,
    group: str | None = None,
    schema: str | None = None,
) -> int:
    """How many inbox rows purge_inbox() would delete now (of GROUP only, if given)."""
    row = conn.execute(
        _writer.statement("purge_count", schema, _SQL), {"older_than": older_than, "group": group}
    ).fetchone()
    return row[0] if row else 0


# --------------------------------------------------------------------------- shared logic


def record_flow(entry: InboxEntry) -> Generator[_writer._Query, list[tuple], bool]:
    """The queries of record(): one INSERT that returns a row only when the pair is new."""
    rows = yield _writer._Query(
        "record_message",
        {
            "group": entry.group,
            "message_id": entry.message_id,
            "topic": entry.topic,
            "partition": entry.partition,
            "offset": entry.offset,
        },
        _SQL,
    )
    return bool(rows)


def inbox_entry(group: str, record: Record, message_id: MessageIdOf | None = None) -> InboxEntry:
    """The inbox row for RECORD, or InboxError (naming the record) when it has no valid id."""
    check_group(group)
    error = getattr(record, "error", None)
    if error is not None and error() is not None:
        raise InboxError(
            f"{describe(record)} is a Kafka error event, not a message: {error()}",
            **coordinates(record),
        )
    if message_id is None:
        value = message_id_of(record)
    else:
        try:
            given = message_id(record)
        except Exception as exc:
            raise InboxError(
                f"{describe(record)}: the message_id function failed: {type(exc).__name__}: {exc}",
                **coordinates(record),
            ) from exc
        value = _as_uuid(given, record, "the message_id function returned")
    return InboxEntry(group, value, record.topic(), record.partition(), record.offset())


def message_id_of(record: Record) -> uuid.UUID:
    """The UUID in RECORD's message_id header (the relay sends it as text: str(uuid))."""
    headers = record.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    values = [v for k, v in pairs if k == MESSAGE_ID_HEADER]
    if not values:
        raise InboxError(
            f"{describe(record)} has no {MESSAGE_ID_HEADER} header: the relay sets one on "
            "every message; for records of other producers pass message_id= to say what "
            "identifies them",
            **coordinates(record),
        )
    if len(set(values)) > 1:
        raise InboxError(
            f"{describe(record)} has {len(values)} different {MESSAGE_ID_HEADER} headers",
            **coordinates(record),
        )
    return _as_uuid(values[0], record, f"its {MESSAGE_ID_HEADER} header is")


def _as_uuid(value: Any, record: Record, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        text = value.decode("ascii") if isinstance(value, bytes) else value
        if isinstance(text, str):
            return uuid.UUID(text)
    except (UnicodeDecodeError, ValueError):
        pass
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise InboxError(f"{describe(record)}: {what} {shown}, not a UUID", **coordinates(record))


def check_group(group: str) -> None:
    if not isinstance(group, str):
        raise TypeError(f"the consumer group must be a str, not {type(group).__name__}")
    if not group:
        raise InboxError("the consumer group must not be empty")


def describe(record: Record) -> str:
    """'record topic 'orders' partition 2 offset 17': where a record came from, for errors."""
    return (
        f"record topic {record.topic()!r} partition {record.partition()} offset {record.offset()}"
    )


def coordinates(record: Record) -> dict[str, Any]:
    return {"topic": record.topic(), "partition": record.partition(), "offset": record.offset()}
