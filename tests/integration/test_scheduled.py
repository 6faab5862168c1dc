"""Scheduled delivery with the real pair: a delayed row is not in Kafka before its due time
and is soon after, it holds back none of its key's later rows, bad input writes nothing, and
the operator sees, cancels and replays scheduled rows."""

import asyncio
import datetime as dt
import json
import threading
import time
import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox
import outbox.sqlalchemy as osa
from outbox import InvalidMessage
from relay.runner import run_relay
from tests.integration.test_relay_kafka import relay_config
from tests.outbox_command import run
from tests.verify import verify

UTC = dt.timezone.utc


def consume_until(bootstrap, topic, done, timeout):
    """Read TOPIC from the start until DONE(records) or TIMEOUT; each record as (partition,
    offset, key, message_id, CreateTime in ms, when this consumer got it: epoch seconds)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"sched-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    got = []
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        deadline = time.monotonic() + timeout
        while not done(got) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=100, timeout=0.1):
                if msg.error():
                    continue
                mid = dict(msg.headers() or [])["message_id"].decode()
                got.append(
                    (msg.partition(), msg.offset(), msg.key(), mid, msg.timestamp()[1], time.time())
                )
        return got
    finally:
        consumer.close()


def test_a_delayed_row_reaches_kafka_after_its_due_time_and_holds_nothing_back(
    dsn, bootstrap, topic
):
    cfg = relay_config(dsn, bootstrap)
    cfg.listen = True  # the promoter's NOTIFY wakes the idle relay
    stop = threading.Event()
    thread = threading.Thread(target=run_relay, args=(cfg, stop))
    thread.start()
    try:
        with psycopg.connect(dsn) as conn:
            with conn.transaction():
                reminder = outbox.publish(
                    conn, topic=topic, key="acct-1", payload={"n": "reminder"}, delay=2.5
                )
            with conn.transaction():
                refund = outbox.publish(conn, topic=topic, key="acct-1", payload={"n": "refund"})
            (due,) = conn.execute(
                "SELECT deliver_at FROM local_message WHERE id = %s", (reminder.id,)
            ).fetchone()
        want = {str(reminder.message_id), str(refund.message_id)}
        got = consume_until(bootstrap, topic, lambda g: want <= {r[3] for r in g}, 30)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    by_mid = {r[3]: r for r in got}
    assert want <= set(by_mid), f"not delivered: {want - set(by_mid)}"
    sent, first_seen = by_mid[str(reminder.message_id)][4:6]
    due_ms = due.timestamp() * 1000
    # The relay produced it (CreateTime) and the consumer saw it only after its due time ...
    assert sent >= due_ms and first_seen >= due.timestamp()
    # ... and soon after: the promoter wakes at the due time (NOTIFY wakes the relay).
    assert sent - due_ms < 5000, f"sent {sent - due_ms:.0f} ms after its due time"
    # The later row of its key was not held behind it: in Kafka first, before the due time.
    refund_rec, reminder_rec = by_mid[str(refund.message_id)], by_mid[str(reminder.message_id)]
    assert refund_rec[0] == reminder_rec[0] and refund_rec[1] < reminder_rec[1]
    assert refund_rec[4] < due_ms
    verify(dsn, bootstrap, topic).assert_clean(allow_duplicates=False)
    with psycopg.connect(dsn) as c:
        rows = c.execute("SELECT status, deliver_at FROM local_message ORDER BY id").fetchall()
    assert rows == [("CONFIRMED", due), ("CONFIRMED", None)]  # deliver_at kept, for `show`


def test_a_promotion_wakes_listening_relays(dsn):
    from relay.store import PostgresStore

    with psycopg.connect(dsn) as conn, conn.transaction():
        row = outbox.publish(conn, topic="t", key="k", payload={}, delay=3600)
    store = PostgresStore(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as listen:
            listen.execute("LISTEN outbox_local_message")
            assert store.promote_due(10) == 0
            assert list(listen.notifies(timeout=0.5, stop_after=1)) == []  # nothing promoted
            with psycopg.connect(dsn) as c, c.transaction():
                c.execute(
                    "UPDATE local_message SET deliver_at = now() - interval '1s' WHERE id = %s",
                    (row.id,),
                )
            assert store.promote_due(10) == 1
            (note,) = list(listen.notifies(timeout=5, stop_after=1))
            assert note.payload == "public"
    finally:
        store.close()


def test_relay_once_delivers_the_rows_due_and_leaves_the_rest_scheduled(dsn, bootstrap, topic):
    past = dt.datetime.now(UTC) - dt.timedelta(seconds=1)
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            later = outbox.publish(conn, topic=topic, key="k", payload={}, delay=3600)
            outbox.publish(conn, topic=topic, key="k", payload={}, deliver_at=past)
        # Due by now but still SCHEDULED (as if written while no relay promoted).
        with conn.transaction():
            due = outbox.publish(conn, topic=topic, key="j", payload={}, delay=3600)
            conn.execute(
                "UPDATE local_message SET deliver_at = now() - interval '1s' WHERE id = %s",
                (due.id,),
            )
    assert run_relay(relay_config(dsn, bootstrap), threading.Event(), until_idle=True) == 0
    with psycopg.connect(dsn) as c:
        left = c.execute("SELECT id, status FROM local_message ORDER BY id").fetchall()
    assert left == [(later.id, "SCHEDULED"), (later.id + 1, "CONFIRMED"), (due.id, "CONFIRMED")]


# -- bad input: one clear error, nothing written


class Base(DeclarativeBase):
    pass


class Invoice(Base, osa.HasEvents):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)


class HookedSession(Session):
    """A Session class of its own, so that the hook installed here touches no other test."""


osa.install(HookedSession)


def count(dsn):
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT count(*) FROM local_message").fetchone()[0]


NAIVE = dt.datetime(2030, 1, 1, 10, 0)


def test_a_naive_deliver_at_is_refused_on_every_path_and_nothing_is_written(dsn):
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            with pytest.raises(InvalidMessage, match="has no time zone"):
                outbox.publish(conn, topic="t", payload={}, deliver_at=NAIVE)
            with pytest.raises(InvalidMessage, match=r"message #1: .*has no time zone"):
                outbox.publish_many(
                    conn,
                    [
                        {"topic": "t", "payload": {}},
                        {"topic": "t", "payload": {}, "deliver_at": NAIVE},
                    ],
                )
            with pytest.raises(InvalidMessage, match="not both"):
                outbox.publish(conn, topic="t", payload={}, delay=1, deliver_at=NAIVE)
            with pytest.raises(InvalidMessage, match="delay must be"):
                outbox.publish(conn, topic="t", payload={}, delay=-5)
            # The transaction is still good: the refusal came before any statement.
            conn.execute("SELECT 1")

    async def in_async():
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            async with aconn.transaction():
                with pytest.raises(InvalidMessage, match="has no time zone"):
                    await outbox.apublish(aconn, topic="t", payload={}, deliver_at=NAIVE)

    asyncio.run(in_async())
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    try:
        Base.metadata.create_all(engine)
        with HookedSession(engine) as s, s.begin():
            with pytest.raises(InvalidMessage, match="has no time zone"):
                osa.publish(s, topic="t", payload={}, deliver_at=NAIVE)
            invoice = Invoice(id=1)
            s.add(invoice)
            with pytest.raises(InvalidMessage, match="has no time zone"):
                invoice.record_event("t", {}, deliver_at=NAIVE)
            assert invoice.pending_events() == []
        # And scheduled through the hook: the same rule as publish().
        with HookedSession(engine) as s, s.begin():
            s.get(Invoice, 1).record_event("t", {"n": 1}, delay=dt.timedelta(hours=1))
    finally:
        engine.dispose()
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT status FROM local_message").fetchall() == [("SCHEDULED",)]


# -- the operator


def test_status_list_and_show_show_scheduled_rows_and_skip_cancels_them(dsn):
    env = {"OUTBOX_DSN": dsn}
    with psycopg.connect(dsn) as conn, conn.transaction():
        soon = outbox.publish(conn, topic="t", key="k", payload={}, delay=3600)
        outbox.publish(conn, topic="t", key="k", payload={}, delay=7200)
        failed = outbox.publish(conn, topic="t", key="f", payload={})
        conn.execute("UPDATE local_message SET status = 'FAILED' WHERE id = %s", (failed.id,))
        (due,) = conn.execute(
            "SELECT deliver_at FROM local_message WHERE id = %s", (soon.id,)
        ).fetchone()
    report = json.loads(run("status", "--json", env=env).stdout)
    assert report["counts"]["SCHEDULED"] == 2
    assert report["scheduled"]["count"] == 2
    assert dt.datetime.fromisoformat(report["scheduled"]["next_due_at"]) == due
    assert 3500 < report["scheduled"]["next_due_in_seconds"] <= 3600
    assert report["oldest_pending_age_seconds"] is None  # waiting on purpose is not lag
    text = run("status", env=env).stdout
    assert "scheduled: 2, next due" in text and "(in 60m)" in text
    listed = run("list", "--status", "SCHEDULED", "--json", env=env)
    assert next(r["deliver_at"] for r in json.loads(listed.stdout)) == due.isoformat()
    assert "due in 60m" in run("list", "--status", "SCHEDULED", env=env).stdout
    assert "deliver at:" in run("show", str(soon.id), env=env).stdout

    # A replay does not send scheduled rows early; a skip without the status leaves them.
    refused = run("replay", "--status", "SCHEDULED", "--yes", env=env)
    assert refused.returncode == 2 and "delivered when they fall due" in refused.stderr
    skipped = run("skip", "--topic", "t", "--yes", env=env)
    assert skipped.returncode == 0, skipped.stderr
    with psycopg.connect(dsn) as c:
        statuses = dict(c.execute("SELECT id, status FROM local_message").fetchall())
    assert statuses == {soon.id: "SCHEDULED", soon.id + 1: "SCHEDULED", failed.id: "SKIPPED"}

    # Cancelled by name of the status, audited like every skip.
    cancel = run(
        "skip",
        str(soon.id),
        "--status",
        "SCHEDULED",
        "--yes",
        "--reason",
        "customer left",
        env=env,
    )
    assert cancel.returncode == 0, cancel.stderr
    entries = json.loads(run("audit", "--json", env=env).stdout)
    assert entries[0]["action"] == "skip" and entries[0]["ids"] == [soon.id]
    assert entries[0]["reason"] == "customer left"
    # The promoter never takes it, however late it gets.
    from relay.store import PostgresStore

    store = PostgresStore(dsn)
    try:
        with psycopg.connect(dsn) as c, c.transaction():
            c.execute("UPDATE local_message SET deliver_at = now() - interval '1s'")
        assert store.promote_due(100) == 1  # the other scheduled row only
    finally:
        store.close()
    with psycopg.connect(dsn) as c:
        assert c.execute(
            "SELECT status FROM local_message WHERE id = %s", (soon.id,)
        ).fetchone() == ("SKIPPED",)
        # A replay of a cancelled row whose time is still ahead schedules it again.
        c.execute(
            "UPDATE local_message SET deliver_at = now() + interval '1 hour' WHERE id = %s",
            (soon.id,),
        )
        c.commit()
    replayed = run("replay", str(soon.id), "--yes", env=env)
    assert replayed.returncode == 0, replayed.stderr
    with psycopg.connect(dsn) as c:
        assert c.execute(
            "SELECT status FROM local_message WHERE id = %s", (soon.id,)
        ).fetchone() == ("SCHEDULED",)


def test_topics_check_names_the_topics_of_scheduled_rows(dsn, bootstrap):
    name = f"t.{uuid.uuid4().hex[:12]}"  # never created: nothing to delete
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=name, payload={}, delay=3600)
    env = {"OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap}
    check = run("topics", "check", env=env)
    assert check.returncode == 1 and f"{name}: missing (1 rows to deliver)" in check.stdout


def test_delay_counts_from_the_insert_not_the_transactions_start(dsn):
    """A delay of 0.5 s given 1 s into a transaction is still ahead at the INSERT: SCHEDULED
    (counted from the transaction's start it would be past, and sent at once)."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("SELECT pg_sleep(1)")
        row = outbox.publish(conn, topic="t", payload={}, delay=0.5)
        (status, late) = conn.execute(
            "SELECT status, deliver_at - now() FROM local_message WHERE id = %s", (row.id,)
        ).fetchone()
    assert status == "SCHEDULED" and late > dt.timedelta(seconds=1)


def test_lag_and_retention_count_a_scheduled_row_from_its_due_time(dsn):
    """A reminder written 30 days ago and due a second ago is one second late, not 30 days;
    delivered, it is kept for the retention after its due time, not after its writing."""
    from relay.store import PostgresStore

    with psycopg.connect(dsn) as conn, conn.transaction():
        ids = [
            conn.execute(
                "INSERT INTO local_message (topic, payload, status, created_at, deliver_at) "
                "VALUES ('t', 'x', %s, now() - interval '30 days', %s) RETURNING id",
                (status, due),
            ).fetchone()[0]
            for status, due in (
                ("PENDING", dt.datetime.now(UTC) - dt.timedelta(seconds=1)),
                ("CONFIRMED", dt.datetime.now(UTC) - dt.timedelta(hours=1)),
                ("CONFIRMED", None),
            )
        ]
    store = PostgresStore(dsn)
    try:
        lag = store.pending_stats(frozenset(range(256))).total().lag_seconds
        deleted = store.delete_confirmed(7 * 86400, 100)
    finally:
        store.close()
    assert lag is not None and lag < 60, lag
    assert deleted == 1  # the unscheduled one
    with psycopg.connect(dsn) as conn:
        left = [i for (i,) in conn.execute("SELECT id FROM local_message ORDER BY id")]
    assert left == ids[:2]
