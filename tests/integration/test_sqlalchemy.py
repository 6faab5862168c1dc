"""SQLAlchemy 2: explicit publish on Session/Connection (sync and async), the ORM hook, and the
schema DDL in a user's own migration."""

import psycopg
import pytest
from sqlalchemy import ForeignKey, String, create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
import outbox.sqlalchemy as osa
from outbox import InvalidMessage, InvalidTopic, NotInTransaction


class Base(DeclarativeBase):
    pass


class Order(Base, osa.HasEvents):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(20))


class Line(Base, osa.HasEvents):
    __tablename__ = "order_lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))


class HookedSession(Session):
    """A Session class of its own, so that the hook installed here touches no other test."""


osa.install(HookedSession)


def engine_for(dsn, **kw):
    return create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn), **kw)


def outbox_rows(dsn):
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT topic, key, payload FROM local_message ORDER BY id").fetchall()


@pytest.fixture
def engine(dsn):
    eng = engine_for(dsn)
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


def test_hook_writes_recorded_events_in_the_same_flush_and_order(engine, dsn):
    with HookedSession(engine) as s, s.begin():
        order = Order(id=1, state="placed")
        order.record_event("orders", {"type": "OrderPlaced"}, key="order-1")
        s.add(order)
        s.flush()
        line = Line(id=1, order_id=1)
        s.add(line)
        line.record_event("orders", {"type": "LineAdded"}, key="order-1")
        order.state = "paid"
        order.record_event("orders", {"type": "OrderPaid"}, key="order-1")
        assert len(order.pending_events()) == 1
        # Not visible to anyone before commit.
        assert outbox_rows(dsn) == []
    assert [r[2] for r in outbox_rows(dsn)] == [
        b'{"type":"OrderPlaced"}',
        b'{"type":"LineAdded"}',
        b'{"type":"OrderPaid"}',
    ]
    assert order.pending_events() == []


def test_event_of_an_entity_loaded_but_not_modified_is_written(engine, dsn):
    with HookedSession(engine) as s, s.begin():
        s.add(Order(id=2, state="placed"))
    with HookedSession(engine) as s, s.begin():
        order = s.get(Order, 2)
        order.record_event("orders", {"type": "Reminder"}, key="order-2")
    assert [r[2] for r in outbox_rows(dsn)] == [b'{"type":"Reminder"}']


def test_rollback_writes_neither_the_entity_nor_its_events(engine, dsn):
    with pytest.raises(RuntimeError):
        with HookedSession(engine) as s, s.begin():
            order = Order(id=3, state="placed")
            order.record_event("orders", {"type": "OrderPlaced"}, key="order-3")
            s.add(order)
            s.flush()
            raise RuntimeError("payment declined")
    assert outbox_rows(dsn) == []
    with HookedSession(engine) as s:
        assert s.get(Order, 3) is None


def test_bad_event_is_refused_where_it_is_recorded(engine):
    order = Order(id=4, state="placed")
    with pytest.raises(InvalidTopic):
        order.record_event("not a topic", {}, key="order-4")
    with pytest.raises(TypeError, match="float"):
        order.record_event("orders", 1.5)
    assert order.pending_events() == []


def test_explicit_publish_on_session_and_core_connection(engine, dsn):
    with Session(engine) as s, s.begin():
        s.add(Order(id=5, state="placed"))
        p = osa.publish(s, topic="orders", key="order-5", payload={"n": 1})
    with engine.begin() as conn:
        many = osa.publish_many(
            conn, [dict(topic="orders", payload={"n": 2}), dict(topic="orders", payload={"n": 3})]
        )
    assert p.id < many[0].id < many[1].id
    assert len(outbox_rows(dsn)) == 3


def stored_headers(dsn):
    with psycopg.connect(dsn) as c:
        return [
            (message_id, {name: value for name, value in headers or []})
            for message_id, headers in c.execute(
                "SELECT message_id, headers FROM local_message ORDER BY id"
            )
        ]


def test_cloudevent_on_publish_and_record_event(engine, dsn):
    with HookedSession(engine) as s, s.begin():
        order = Order(id=7, state="placed")
        s.add(order)
        order.record_event(
            "orders",
            {"type": "OrderPlaced"},
            key="order-7",
            cloudevent=outbox.CloudEvent(type="com.example.order.placed", source="/orders"),
        )
        # validated where it is recorded, like the rest of the event
        with pytest.raises(TypeError, match="cloudevent type must be a str"):
            order.record_event("orders", {}, cloudevent={"type": 1, "source": "/orders"})
        assert len(order.pending_events()) == 1
        p = osa.publish(
            s,
            topic="orders",
            payload="shipped",
            cloudevent={"type": "com.example.order.shipped", "source": "/orders", "subject": "7"},
        )
    # publish() writes at once; the recorded event is written in the flush at commit
    (second_id, second), (first_id, first) = stored_headers(dsn)
    assert second_id == p.message_id
    assert (first["ce_id"], first["ce_type"], first["content-type"]) == (
        str(first_id),
        "com.example.order.placed",
        "application/json",
    )
    assert (second["ce_id"], second["ce_type"], second["ce_subject"], second["content-type"]) == (
        str(p.message_id),
        "com.example.order.shipped",
        "7",
        "text/plain; charset=utf-8",
    )


def test_autocommit_connection_is_refused(engine):
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        with pytest.raises(NotInTransaction):
            osa.publish(conn, topic="orders", payload={})


async def test_async_session_publish_and_hook(dsn):
    eng = create_async_engine(
        "postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(dsn)
    )
    try:
        async with eng.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        make = sessionmaker(class_=AsyncSession, sync_session_class=HookedSession, bind=eng)
        async with make() as s, s.begin():
            order = Order(id=6, state="placed")
            order.record_event("orders", {"type": "OrderPlaced"}, key="order-6")
            s.add(order)
            await osa.apublish(s, topic="orders", key="order-6", payload={"type": "Explicit"})
        async with make() as s:
            with pytest.raises(RuntimeError):
                async with s.begin():
                    await osa.apublish(s, topic="orders", payload={"type": "RolledBack"})
                    raise RuntimeError("no")
    finally:
        await eng.dispose()
    assert [r[2] for r in outbox_rows(dsn)] == [b'{"type":"Explicit"}', b'{"type":"OrderPlaced"}']


def test_core_table_reads_the_outbox(engine, dsn):
    from sqlalchemy import MetaData, select

    table = osa.local_message_table(MetaData())
    with Session(engine) as s, s.begin():
        osa.publish(s, topic="orders", key=b"\x00k", payload=b"raw")
    with engine.connect() as conn:
        row = conn.execute(
            select(table.c.topic, table.c.key, table.c.payload, table.c.status, table.c.bucket)
        ).one()
    assert row[:4] == ("orders", b"\x00k", b"raw", "PENDING")


def test_mapped_class_reads_rows_with_the_orm(engine):
    from sqlalchemy import select

    with Session(engine) as s, s.begin():
        p = osa.publish(s, topic="orders", key="k", payload={"n": 1})
    with Session(engine) as s:
        (row,) = s.scalars(select(osa.LocalMessage).where(osa.LocalMessage.status == "PENDING"))
        assert (row.id, row.message_id, row.payload, row.attempts) == (
            p.id,
            p.message_id,
            b'{"n":1}',
            0,
        )


def test_schema_ddl_in_a_users_own_migration(empty_dsn):
    eng = engine_for(empty_dsn)
    try:
        with eng.begin() as conn:  # what Alembic's op.execute() does with a string
            conn.execute(text("SET LOCAL search_path = public"))
            conn.execute(text(osa.create_schema_sql("billing")))
            assert conn.execute(text("SHOW search_path")).scalar() == "public"
        with eng.begin() as conn:
            conn.execute(text(osa.create_schema_sql("billing")))  # again: no change
            version = conn.execute(text("SELECT max(version) FROM billing.local_message_schema"))
            assert version.scalar() == outbox.SCHEMA_VERSION
    finally:
        eng.dispose()


def test_recorded_events_carry_their_tenant(engine, dsn):
    with HookedSession(engine) as s, s.begin():
        order = Order(id=1, state="placed")
        order.record_event("orders", {"type": "OrderPlaced"}, key="order-1", tenant="acme")
        s.add(order)
    with pytest.raises(InvalidMessage, match="invalid tenant"):
        Order(id=2, state="x").record_event("orders", {}, tenant="no spaces")
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT tenant FROM local_message").fetchall() == [("acme",)]
