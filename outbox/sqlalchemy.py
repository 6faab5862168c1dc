"""SQLAlchemy 2 integration: the local_message table, publish() on a Session or Connection,
and an ORM hook that writes the events entities record in the same flush.

    from outbox.sqlalchemy import HasEvents, install, publish

    class Account(Base, HasEvents): ...

    install(Session)                      # once, on your Session class or sessionmaker
    with Session(engine) as s, s.begin():
        acct = s.get(Account, 1)
        acct.balance -= 10
        acct.record_event("accounts", {"debited": 10}, key=f"account-{acct.id}")
    # commit: the UPDATE and the outbox row commit together; rollback writes neither.

Needs the psycopg 3 driver (``postgresql+psycopg://``): the rows are written on the Session's
own DBAPI connection, inside its transaction, by the same code as outbox.publish().
"""

from __future__ import annotations

import datetime as dt
import itertools
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    Uuid,
    event,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, registry

from . import writer as _writer
from .cloudevent import CloudEvent
from .errors import OutboxError
from .message import DEFAULT_MAX_MESSAGE_BYTES, OutboxMessage
from .sql import schema_sql, validate_identifier

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

_EVENTS_ATTR = "_outbox_pending_events"
#: Recording order across all entities of a flush (a process-wide counter).
_RECORDED = itertools.count()
_SESSION_KEY = "outbox_recorders"

_T = TypeVar("_T")


def local_message_table(metadata: MetaData, schema: str | None = None) -> Table:
    """A Core Table for local_message, for queries and reports in SQLAlchemy. It is not meant
    for metadata.create_all(): the DDL (identity, generated bucket, indexes, trigger) comes
    from schema.sql; see create_schema_sql()."""
    return Table(
        "local_message",
        metadata,
        Column("id", BigInteger, primary_key=True),
        Column("message_id", Uuid, nullable=False),
        Column("topic", Text, nullable=False),
        Column("key", LargeBinary),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", JSON().with_variant(JSONB(), "postgresql")),
        Column("bucket", SmallInteger, nullable=False),
        Column("status", Text, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("next_attempt_at", DateTime(timezone=True)),
        Column("last_error", Text),
        Column("claim_token", Uuid),
        Column("claim_expires_at", DateTime(timezone=True)),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("delivered_at", DateTime(timezone=True)),
        Column("kafka_partition", Integer),
        Column("kafka_offset", BigInteger),
        Column("dedup_key", Text),
        Column("tenant", Text, nullable=False),
        Column("deliver_at", DateTime(timezone=True)),
        schema=schema,
        info={"outbox": True},
    )


class LocalMessage:
    """An ORM class mapped to public.local_message (in a registry of its own, so that it never
    joins your metadata's create_all()), for reading the outbox with the ORM:

        session.scalars(select(LocalMessage).where(LocalMessage.status == "FAILED"))
    """

    __table__: Table


_registry = registry()
LocalMessage.__table__ = local_message_table(_registry.metadata)
_registry.map_imperatively(LocalMessage, LocalMessage.__table__)


def create_schema_sql(schema: str | None = None) -> str:
    """The DDL of schema.sql for SCHEMA, for a migration of your own (Alembic, Flyway ...):

        def upgrade():
            op.execute(outbox.sqlalchemy.create_schema_sql("public"))

    It switches the search_path to SCHEMA for the statements of schema.sql and puts the
    caller's search_path back afterwards."""
    target = validate_identifier(schema or "public")
    return (
        f'CREATE SCHEMA IF NOT EXISTS "{target}";\n'
        "SELECT set_config('outbox.saved_search_path', current_setting('search_path'), true);\n"
        f"SELECT set_config('search_path', '\"{target}\"', true);\n"
        + schema_sql()
        + "\nSELECT set_config('search_path', current_setting('outbox.saved_search_path'), true);\n"
    )


def _connection(session_or_connection: Session | Connection) -> Connection:
    if isinstance(session_or_connection, Session):
        return session_or_connection.connection()
    return session_or_connection


def _run(
    conn: Connection,
    flow: Generator[_writer._Query, list[tuple], _T],
    schema: str | None,
    purpose: str = "publish",
) -> _T:
    """Run a writer (or inbox) flow through SQLAlchemy, on the connection's DBAPI connection
    and in its transaction: the same queries as outbox.publish() (outbox.inbox.record()), for
    sync sessions and (inside their greenlet) async ones alike."""
    driver = conn.connection.driver_connection
    if not isinstance(driver, (psycopg.Connection, psycopg.AsyncConnection)):
        raise OutboxError(
            "outbox.sqlalchemy needs the psycopg 3 driver (postgresql+psycopg://), not "
            f"{type(driver).__module__}"
        )
    _writer.check_transaction(driver, purpose)
    try:
        step = next(flow)
        while True:
            result = conn.exec_driver_sql(
                _writer.statement(step.name, schema, step.file).as_string(None), step.params
            )
            rows = [tuple(r) for r in result] if result.returns_rows else []
            step = flow.send(rows)
    except StopIteration as done:
        return done.value


def publish(
    session_or_connection: Session | Connection,
    *,
    lock_key: bool = False,
    schema: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    **event: Any,
) -> _writer.Published:
    """outbox.publish() in the Session's (or Core Connection's) current transaction. EVENT is
    topic=, payload=, and optionally key=, headers=, dedup_key=, tenant=, cloudevent=,
    deliver_at=, delay=."""
    built = _writer.build_all([event], max_bytes)
    conn = _connection(session_or_connection)
    return _run(conn, _writer.publish_flow(built, lock_key), schema)[0]


def publish_many(
    session_or_connection: Session | Connection,
    messages: Iterable[Mapping[str, Any] | OutboxMessage],
    *,
    lock_key: bool = False,
    schema: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[_writer.Published]:
    built = _writer.build_all(messages, max_bytes)
    return _run(_connection(session_or_connection), _writer.publish_flow(built, lock_key), schema)


async def apublish(
    session_or_connection: AsyncSession | AsyncConnection, **kwargs: Any
) -> _writer.Published:
    """publish() for an AsyncSession or AsyncConnection."""
    return await session_or_connection.run_sync(lambda s: publish(s, **kwargs))


async def apublish_many(
    session_or_connection: AsyncSession | AsyncConnection,
    messages: Iterable[Mapping[str, Any] | OutboxMessage],
    **kwargs: Any,
) -> list[_writer.Published]:
    """publish_many() for an AsyncSession or AsyncConnection."""
    return await session_or_connection.run_sync(lambda s: publish_many(s, messages, **kwargs))


class HasEvents:
    """Mixin for mapped classes: ``entity.record_event(topic, payload, key=...)`` queues an
    event that install()'s hook writes as an outbox row in the next flush of the entity's
    Session, in the same transaction as the entity's own changes."""

    def record_event(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | bytes | int | None = None,
        headers: Any = None,
        dedup_key: str | None = None,
        tenant: str | None = None,
        cloudevent: CloudEvent | Mapping[str, Any] | None = None,
        deliver_at: dt.datetime | None = None,
        delay: dt.timedelta | float | None = None,
    ) -> None:
        # Validate now, where the caller's code is, not at flush time. A delay counts from
        # the flush's INSERT (the database's clock at that statement), not from this call.
        event = dict(topic=topic, payload=payload, key=key, headers=headers, dedup_key=dedup_key)
        event.update(tenant=tenant, cloudevent=cloudevent, deliver_at=deliver_at, delay=delay)
        message = _writer.build_all([event], _max_bytes(self))[0]
        self.__dict__.setdefault(_EVENTS_ATTR, []).append((next(_RECORDED), message))
        from sqlalchemy.orm import object_session
        from sqlalchemy.orm.attributes import flag_dirty

        session = object_session(self)
        if session is not None:
            session.info.setdefault(_SESSION_KEY, weakref.WeakSet()).add(self)
            # An entity with no changed column would not make commit flush at all; marking
            # it dirty makes the flush (and our hook) run, without an UPDATE of its own.
            flag_dirty(self)

    def pending_events(self) -> list[OutboxMessage]:
        """Events recorded and not yet flushed."""
        return [message for _, message in self.__dict__.get(_EVENTS_ATTR, ())]


def _max_bytes(obj: Any) -> int:
    return getattr(obj, "__outbox_max_bytes__", DEFAULT_MAX_MESSAGE_BYTES)


def install(
    session_class: Any = Session, *, schema: str | None = None, lock_key: bool = False
) -> Callable[[Session, Any, Any], None]:
    """Write recorded events in every flush of SESSION_CLASS (a Session subclass, a
    sessionmaker, or Session itself for all sessions; an AsyncSession's flushes run its
    sync_session, so install on that class, which is Session by default)."""

    @event.listens_for(session_class, "before_flush")
    def _write_events(session: Session, _flush_context: Any, _instances: Any) -> None:
        recorders = set(session.info.get(_SESSION_KEY, ()))
        recorders.update(o for o in session.new if isinstance(o, HasEvents))
        recorders.update(o for o in session.dirty if isinstance(o, HasEvents))
        recorded = []
        for obj in recorders:
            recorded.extend(obj.__dict__.pop(_EVENTS_ATTR, ()))
        session.info.pop(_SESSION_KEY, None)
        if recorded:
            recorded.sort(key=lambda item: item[0])
            _run(
                session.connection(),
                _writer.publish_flow([m for _, m in recorded], lock_key),
                schema,
            )

    return _write_events
