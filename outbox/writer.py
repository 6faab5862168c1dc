"""publish() and publish_many(): write outbox rows inside the caller's own transaction.

They never commit: the event commits or rolls back with the business change around it. The
logic is written once, as a generator of queries (``publish_flow``); the sync and async entry
points only run the queries it yields on their kind of connection.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import psycopg
from psycopg import pq, sql

from . import sql as outbox_sql
from .cloudevent import CloudEvent
from .errors import NotInTransaction
from .message import DEFAULT_MAX_MESSAGE_BYTES, Headers, OutboxMessage, Payload, build_message
from .tracing import trace_headers

#: First half of the two-integer advisory lock key, so that our key locks do not collide with
#: the application's own advisory locks (which mostly use the one-bigint form).
ADVISORY_LOCK_NAMESPACE = 0x0B0C

AnyConnection: TypeAlias = psycopg.Connection | psycopg.AsyncConnection

_T = TypeVar("_T")


@dataclass(frozen=True)
class Published:
    """Where an event was written: its row id and its message_id."""

    id: int
    message_id: uuid.UUID
    #: False when dedup_key matched an existing row, whose ids these are; nothing was written.
    created: bool = True


@dataclass(frozen=True)
class _Query:
    name: str
    params: Mapping[str, Any]
    #: The package's .sql file that holds the block (the inbox keeps its own).
    file: str = "queries.sql"


def publish(
    conn: psycopg.Connection,
    *,
    topic: str,
    payload: Payload,
    key: str | bytes | int | None = None,
    headers: Headers | None = None,
    dedup_key: str | None = None,
    tenant: str | None = None,
    cloudevent: CloudEvent | Mapping[str, Any] | None = None,
    deliver_at: dt.datetime | None = None,
    delay: dt.timedelta | float | None = None,
    lock_key: bool = False,
    schema: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Published:
    """Write one event in CONN's current transaction and return its ids. Never commits.

    ``tenant``: whose event this is, when one outbox serves many tenants (None: no tenant).
    The relay delivers fairly across tenants, and keeps each key's order within its tenant.

    ``cloudevent``: an outbox.CloudEvent (or a mapping of its fields) makes the Kafka record a
    CloudEvent in the Kafka binding's binary mode: ce_ headers and content-type are added at
    write time, ce_id being the message_id and ce_time this process's clock at this call
    (docs/writing-events.md).

    ``deliver_at`` (a time-zone aware datetime) or ``delay`` (a timedelta or seconds, counted
    from the INSERT by the database's clock): the event is not sent before then. A due time
    not after the INSERT is no schedule: the row is sent at once. A
    scheduled row does not hold back its key's later events; it takes its place in its key's
    order when it falls due (docs/guarantees.md).

    ``lock_key=True`` takes a transaction-level advisory lock on the key first, so that
    writers of one key are serialised and their events are delivered in commit order.
    """
    message = build_message(
        topic=topic,
        payload=payload,
        key=key,
        headers=with_trace(headers),
        dedup_key=dedup_key,
        tenant=tenant,
        max_bytes=max_bytes,
        cloudevent=cloudevent,
        deliver_at=deliver_at,
        delay=delay,
    )
    return _run_sync(conn, publish_flow([message], lock_key), schema)[0]


def publish_many(
    conn: psycopg.Connection,
    messages: Iterable[Mapping[str, Any] | OutboxMessage],
    *,
    lock_key: bool = False,
    schema: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Published]:
    """Write many events in one round trip, in the given order. Each item is a mapping with the
    keyword arguments of publish() (topic, payload, key, headers, dedup_key, tenant,
    cloudevent, deliver_at, delay). Nothing is written if any of them is invalid."""
    built = build_all(messages, max_bytes)
    return _run_sync(conn, publish_flow(built, lock_key), schema)


async def apublish(
    conn: psycopg.AsyncConnection,
    *,
    topic: str,
    payload: Payload,
    key: str | bytes | int | None = None,
    headers: Headers | None = None,
    dedup_key: str | None = None,
    tenant: str | None = None,
    cloudevent: CloudEvent | Mapping[str, Any] | None = None,
    deliver_at: dt.datetime | None = None,
    delay: dt.timedelta | float | None = None,
    lock_key: bool = False,
    schema: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Published:
    """publish() for an AsyncConnection."""
    message = build_message(
        topic=topic,
        payload=payload,
        key=key,
        headers=with_trace(headers),
        dedup_key=dedup_key,
        tenant=tenant,
        max_bytes=max_bytes,
        cloudevent=cloudevent,
        deliver_at=deliver_at,
        delay=delay,
    )
    return (await _run_async(conn, publish_flow([message], lock_key), schema))[0]


async def apublish_many(
    conn: psycopg.AsyncConnection,
    messages: Iterable[Mapping[str, Any] | OutboxMessage],
    *,
    lock_key: bool = False,
    schema: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Published]:
    """publish_many() for an AsyncConnection."""
    built = build_all(messages, max_bytes)
    return await _run_async(conn, publish_flow(built, lock_key), schema)


# --------------------------------------------------------------------------- shared logic


def with_trace(headers: Headers | None) -> Headers | None:
    extra = trace_headers()
    if not extra:
        return headers
    given = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
    names = {name for name, _ in given}
    return given + [(k, v) for k, v in extra if k not in names]


def build_all(
    messages: Iterable[Mapping[str, Any] | OutboxMessage], max_bytes: int
) -> list[OutboxMessage]:
    built = []
    for i, item in enumerate(messages):
        if isinstance(item, OutboxMessage):
            built.append(item)
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"message #{i} must be a mapping, not {type(item).__name__}")
        kwargs = dict(item)
        kwargs["headers"] = with_trace(kwargs.get("headers"))
        try:
            built.append(build_message(max_bytes=max_bytes, **kwargs))
        except TypeError as exc:
            raise TypeError(f"message #{i}: {exc}") from exc
        except ValueError as exc:
            raise type(exc)(f"message #{i}: {exc}") from exc
    return built


def advisory_lock_id(key: bytes) -> int:
    """The second half of a key's advisory lock: a signed 32-bit hash of the key."""
    return int.from_bytes(hashlib.md5(key).digest()[:4], "big", signed=True)


def publish_flow(
    messages: list[OutboxMessage], lock_key: bool
) -> Generator[_Query, list[tuple], list[Published]]:
    if not messages:
        return []
    if lock_key:
        lock_ids = sorted({advisory_lock_id(m.key) for m in messages if m.key is not None})
        if lock_ids:
            yield _Query("lock_keys", {"namespace": ADVISORY_LOCK_NAMESPACE, "lock_ids": lock_ids})
    # Scheduling columns only when some row is scheduled: unnest() pads the empty arrays
    # with NULLs, and the common batch pays nothing for them.
    scheduled = any(m.deliver_at is not None or m.delay is not None for m in messages)
    rows = yield _Query(
        "insert_messages",
        {
            "message_ids": [m.message_id for m in messages],
            "topics": [m.topic for m in messages],
            "keys": [m.key for m in messages],
            "payloads": [m.payload for m in messages],
            "headers": [m.headers_json() for m in messages],
            "dedup_keys": [m.dedup_key for m in messages],
            "tenants": [m.tenant for m in messages],
            "deliver_ats": [m.deliver_at for m in messages] if scheduled else [],
            "delays": [m.delay for m in messages] if scheduled else [],
        },
    )
    ids = {message_id: row_id for row_id, message_id in rows}
    existing: dict[tuple[str, str], tuple[int, uuid.UUID]] = {}
    missing = [m for m in messages if m.message_id not in ids and m.dedup_key]
    if missing:
        found = yield _Query(
            "find_by_dedup_keys",
            {"tenants": [m.tenant for m in missing], "dedup_keys": [m.dedup_key for m in missing]},
        )
        existing = {(tenant, dedup): (row_id, mid) for row_id, mid, tenant, dedup in found}
    result = []
    for m in messages:
        if m.message_id in ids:
            result.append(Published(ids[m.message_id], m.message_id))
        else:
            # Only a dedup_key conflict makes ON CONFLICT skip a row.
            row_id, mid = existing[(m.tenant, m.dedup_key)]  # type: ignore[index]
            result.append(Published(row_id, mid, created=False))
    return result


#: What a refusal says, by caller: (doing what, which row would commit alone, around what).
_PURPOSES = {
    "publish": ("publish()", "publishing", "the event", "the business change and publish()"),
    "inbox": (
        "outbox.inbox.record()",
        "recording a message in the inbox",
        "the inbox row",
        "the handler's writes and record()",
    ),
}


def check_transaction(conn: AnyConnection, purpose: str = "publish") -> None:
    """Refuse a connection where a row written now would not commit with the caller's other
    writes: a failed transaction, autocommit outside a transaction, a closed connection."""
    call, doing, row, around = _PURPOSES[purpose]
    status = conn.info.transaction_status
    if status == pq.TransactionStatus.INERROR:
        raise NotInTransaction(
            f"the connection's transaction has failed; roll it back before {doing}"
        )
    if conn.autocommit and status == pq.TransactionStatus.IDLE:
        raise NotInTransaction(
            f"{call} needs a transaction: this connection is in autocommit mode and no "
            f"transaction is open, so {row} would commit on its own. Use "
            f"`with conn.transaction():` around {around}."
        )
    if conn.closed:
        raise NotInTransaction("the connection is closed")


def _run_sync(
    conn: psycopg.Connection,
    flow: Generator[_Query, list[tuple], _T],
    schema: str | None,
    purpose: str = "publish",
) -> _T:
    check_transaction(conn, purpose)
    try:
        step = next(flow)
        while True:
            cur = conn.execute(statement(step.name, schema, step.file), step.params)
            step = flow.send(cur.fetchall() if cur.description else [])
    except StopIteration as done:
        return done.value


async def _run_async(
    conn: psycopg.AsyncConnection,
    flow: Generator[_Query, list[tuple], _T],
    schema: str | None,
    purpose: str = "publish",
) -> _T:
    check_transaction(conn, purpose)
    try:
        step = next(flow)
        while True:
            cur = await conn.execute(statement(step.name, schema, step.file), step.params)
            step = flow.send(await cur.fetchall() if cur.description else [])
    except StopIteration as done:
        return done.value


def statement(name: str, schema: str | None, file: str = "queries.sql") -> sql.Composed:
    """The package's SQL block NAME (from FILE) for SCHEMA."""
    return outbox_sql.query("outbox", file, name, schema)
