"""The consumers' inbox against the real PostgreSQL and Kafka: under redelivery every side
effect happens exactly once; a failing handler or a record without a message_id leaves no
inbox row and no stored offset, and no later record goes past it."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from outbox import HandlerFailed, InboxError, NotInTransaction, inbox
from outbox.consumer import Handled, InboxConsumer
from tests.conftest import ROOT
from tests.relay_process import wait_for
from tests.unit.inbox_fakes import message as stand_in


@pytest.fixture
def effects(dsn):
    """The handlers' side effect: one row per run of a handler, no unique key (a second run
    of the same message shows as a second row)."""
    with psycopg.connect(dsn) as c:
        c.execute(
            "CREATE TABLE effect (id bigint GENERATED ALWAYS AS IDENTITY, "
            "message_id uuid NOT NULL, value text NOT NULL)"
        )

    def read() -> list[tuple[str, str]]:
        with psycopg.connect(dsn) as c:
            return [
                (str(m), v)
                for m, v in c.execute("SELECT message_id, value FROM effect ORDER BY id")
            ]

    return read


def inbox_rows(dsn, group=None):
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT consumer_group, message_id::text, topic, kafka_partition, kafka_offset "
            "FROM inbox_message WHERE consumer_group = coalesce(%s, consumer_group) "
            "ORDER BY kafka_partition, kafka_offset",
            (group,),
        ).fetchall()


def produce(bootstrap, topic, records) -> list[tuple[str | None, int]]:
    """Write RECORDS, each (value, message_id or None for no header, or a headers list), to
    partition 0 in order; return their (message_id, offset)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    reports: list = []
    for value, mid in records:
        headers = (
            mid
            if isinstance(mid, list)
            else ([("message_id", str(mid).encode())] if mid is not None else None)
        )
        producer.produce(
            topic,
            value=value.encode(),
            partition=0,
            headers=headers,
            on_delivery=lambda err, msg: reports.append((err, msg)),
        )
    assert producer.flush(30) == 0, "not delivered within 30 s"
    assert all(err is None for err, _ in reports), reports
    return [
        (str(mid) if mid is not None and not isinstance(mid, list) else None, msg.offset())
        for (value, mid), (_, msg) in zip(records, reports, strict=True)
    ]


def settings(bootstrap, group):
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    }


def write_effect(conn, msg):
    mid = dict(msg.headers())["message_id"].decode()
    conn.execute(
        "INSERT INTO effect (message_id, value) VALUES (%s, %s)", (mid, msg.value().decode())
    )


def handle(consumer: InboxConsumer, n: int, timeout: float = 60) -> list[Handled]:
    """Poll until N records were handled, or fail after TIMEOUT seconds."""
    out: list[Handled] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"{len(out)} of {n} records handled in {timeout}s"
        handled = consumer.poll_once(0.5)
        if handled is not None:
            out.append(handled)
    return out


def committed(bootstrap, group, topic, partition=0) -> int:
    """The offset GROUP committed for the partition (-1001: none)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = c.committed([TopicPartition(topic, partition)], timeout=15)
        return tp.offset
    finally:
        c.close()


def test_a_message_delivered_twice_has_its_side_effect_once(dsn, bootstrap, topic, effects):
    """At-least-once redelivery: the same message_id at two offsets (as when the relay sends a
    row again). The handler runs for the first copy only, and both offsets are stored."""
    a, b = uuid.uuid4(), uuid.uuid4()
    produced = produce(bootstrap, topic, [("a", a), ("b", b), ("a again", a), ("b again", b)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    with (
        psycopg.connect(dsn) as conn,
        InboxConsumer(settings(bootstrap, group), [topic], write_effect, conn=conn) as consumer,
    ):
        handled = handle(consumer, 4)
    assert [(h.offset, h.new) for h in handled] == [
        (o, new) for (_, o), new in zip(produced, [True, True, False, False], strict=True)
    ]
    assert effects() == [(str(a), "a"), (str(b), "b")]
    assert [r[1] for r in inbox_rows(dsn, group)] == [str(a), str(b)]
    assert committed(bootstrap, group, topic) == produced[-1][1] + 1


def test_killed_between_the_commit_and_the_offset_the_record_comes_again_and_is_skipped(
    dsn, bootstrap, topic, effects
):
    """SIGKILL after a record's transaction committed and before its offset was stored: the
    restarted consumer gets the record again, the inbox skips it, every effect is there once."""
    produced = produce(bootstrap, topic, [(f"v{i}", uuid.uuid4()) for i in range(5)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "INBOX_DSN": dsn,
        "INBOX_BOOTSTRAP": bootstrap,
        "INBOX_TOPIC": topic,
        "INBOX_GROUP": group,
        "INBOX_LAST_OFFSET": str(produced[-1][1]),
        "INBOX_TIMEOUT": "90",
    }
    kill_at = produced[2][1]
    procs: list[subprocess.Popen] = []

    def start(**extra) -> subprocess.Popen:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.inbox_consumer_process"],
                cwd=ROOT,
                env={**env, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        return procs[-1]

    try:
        first = start(INBOX_KILL_AT_OFFSET=str(kill_at))
        out1, _ = first.communicate(timeout=120)
        assert first.returncode == -9, out1
        assert f"killing myself at offset {kill_at}" in out1
        # The killed record's transaction had committed: its effect and inbox row are there.
        assert [v for _, v in effects()] == ["v0", "v1", "v2"]
        assert committed(bootstrap, group, topic) <= kill_at, "its offset was never stored"

        second = start()
        out2, _ = second.communicate(timeout=120)
        assert second.returncode == 0, out2
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    lines = [line.split() for line in out2.splitlines() if line.startswith("handled")]
    by_offset = {int(o): (mid, state) for _, _, o, mid, state in lines}
    assert by_offset[kill_at] == (produced[2][0], "skipped"), out2
    assert [by_offset[o][1] for _, o in produced[3:]] == ["new", "new"]
    assert sorted(v for _, v in effects()) == [f"v{i}" for i in range(5)], "each exactly once"
    assert len(inbox_rows(dsn, group)) == 5
    assert committed(bootstrap, group, topic) == produced[-1][1] + 1


@pytest.fixture
def failing(bootstrap, topic):
    """Records a, x, b on partition 0 and a handler that fails on x while `broken` is set."""
    produced = produce(bootstrap, topic, [(v, uuid.uuid4()) for v in ("a", "x", "b")])
    state = {"broken": True, "tries": 0}

    def handler(conn, msg):
        write_effect(conn, msg)  # written, then rolled back with the failure
        if msg.value() == b"x" and state["broken"]:
            state["tries"] += 1
            raise ValueError("ledger account 7 missing")

    return produced, state, handler


def test_a_handler_that_raises_leaves_no_row_and_no_stored_offset(
    dsn, bootstrap, topic, effects, failing
):
    """Bad input from the handler's side: after max_attempts the record is neither recorded
    nor stored, the committed offset stops before it, and once the handler is fixed a new
    consumer processes it, and then the later record."""
    produced, state, handler = failing
    group = f"g-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn) as conn:
        consumer = InboxConsumer(
            settings(bootstrap, group),
            [topic],
            handler,
            conn=conn,
            max_attempts=3,
            backoff=0.05,
            max_backoff=0.1,
        )
        try:
            with pytest.raises(HandlerFailed) as caught:
                consumer.run(timeout=60)
        finally:
            consumer.close()  # commits the stored offsets
        x_offset = produced[1][1]
        assert (caught.value.topic, caught.value.partition, caught.value.offset) == (
            topic,
            0,
            x_offset,
        )
        assert f"record topic '{topic}' partition 0 offset {x_offset}" in str(caught.value)
        assert state["tries"] == 3
        assert [v for _, v in effects()] == ["a"]
        assert [r[4] for r in inbox_rows(dsn, group)] == [produced[0][1]]
        assert committed(bootstrap, group, topic) == x_offset, "stored up to x, not past it"

        state["broken"] = False
        with InboxConsumer(settings(bootstrap, group), [topic], handler, conn=conn) as again:
            handled = handle(again, 2)
    assert [(h.offset, h.new) for h in handled] == [(x_offset, True), (produced[2][1], True)]
    assert [v for _, v in effects()] == ["a", "x", "b"]


def test_after_giving_up_the_same_consumer_goes_on_from_the_failed_record(
    dsn, bootstrap, topic, effects, failing
):
    """The rewind, against librdkafka: b was already fetched when x failed; without the seek
    back, the next poll would hand out b, store its offset and so commit past x."""
    produced, state, handler = failing
    group = f"g-{uuid.uuid4().hex[:8]}"
    with (
        psycopg.connect(dsn) as conn,
        InboxConsumer(
            settings(bootstrap, group), [topic], handler, conn=conn, max_attempts=1
        ) as consumer,
    ):
        with pytest.raises(HandlerFailed):
            consumer.run(timeout=60)
        state["broken"] = False
        handled = handle(consumer, 2)
    assert [h.offset for h in handled] == [produced[1][1], produced[2][1]]
    assert [v for _, v in effects()] == ["a", "x", "b"]


def test_a_handler_that_swallows_a_database_error_is_not_done(dsn, bootstrap, topic, effects):
    """psycopg ends a transaction block whose transaction failed without an error (COMMIT of
    a failed transaction rolls back): the consumer must not store that record's offset."""
    produced = produce(bootstrap, topic, [("a", uuid.uuid4())])

    def handler(conn, msg):
        write_effect(conn, msg)
        try:
            conn.execute("SELECT 1 / 0")
        except psycopg.errors.DivisionByZero:
            pass

    group = f"g-{uuid.uuid4().hex[:8]}"
    with (
        psycopg.connect(dsn) as conn,
        InboxConsumer(
            settings(bootstrap, group), [topic], handler, conn=conn, max_attempts=2, backoff=0.01
        ) as consumer,
    ):
        with pytest.raises(HandlerFailed, match="left the transaction failed"):
            consumer.run(timeout=60)
    assert effects() == [] and inbox_rows(dsn, group) == []
    assert committed(bootstrap, group, topic) < produced[0][1] + 1


@pytest.mark.parametrize(
    "headers, problem",
    [
        (None, "has no message_id header"),
        ([("message_id", b"12345")], "its message_id header is b'12345', not a UUID"),
    ],
)
def test_a_record_without_a_valid_message_id_is_refused_and_nothing_written(
    dsn, bootstrap, topic, effects, headers, problem
):
    produced = produce(
        bootstrap, topic, [("a", uuid.uuid4()), ("bad", headers or []), ("b", uuid.uuid4())]
    )
    bad = produced[1][1]
    group = f"g-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn) as conn:
        consumer = InboxConsumer(settings(bootstrap, group), [topic], write_effect, conn=conn)
        try:
            with pytest.raises(InboxError) as caught:
                consumer.run(timeout=60)
            assert str(caught.value).startswith(f"record topic '{topic}' partition 0 offset {bad}")
            assert problem in str(caught.value)
            with pytest.raises(InboxError):  # still the next record: b does not go past it
                consumer.run(timeout=60)
        finally:
            consumer.close()
    assert [v for _, v in effects()] == ["a"]
    assert len(inbox_rows(dsn, group)) == 1
    assert committed(bootstrap, group, topic) == bad


def test_records_of_other_producers_are_known_by_a_function(dsn, bootstrap, topic, effects):
    produce(bootstrap, topic, [("order-1", []), ("order-2", []), ("order-1", [])])
    ns = uuid.UUID("0192d3c4-0000-7000-8000-00000000abcd")
    seen = []
    group = f"g-{uuid.uuid4().hex[:8]}"
    with (
        psycopg.connect(dsn) as conn,
        InboxConsumer(
            settings(bootstrap, group),
            [topic],
            lambda c, m: seen.append(m.value()),
            conn=conn,
            message_id=lambda m: uuid.uuid5(ns, m.value().decode()),
        ) as consumer,
    ):
        handled = handle(consumer, 3)
    assert [h.new for h in handled] == [True, True, False]
    assert seen == [b"order-1", b"order-2"]


def test_concurrent_copies_wait_for_the_first_and_then_skip_or_take_over(dsn):
    """Two consumers with the same message at once (a rebalance, or keyless copies on two
    partitions): the second waits on the key until the first ends; it skips the message if
    the first committed, and processes it if the first rolled back."""
    for first_commits, second_gets in ((True, False), (False, True)):
        rec = stand_in("t", 0, 1)
        with psycopg.connect(dsn) as c1, psycopg.connect(dsn) as c2:
            result = []
            c1.execute("BEGIN")
            assert inbox.record(c1, "g", rec) is True
            pid2 = c2.info.backend_pid

            def second(c2=c2, rec=rec, result=result):
                with c2.transaction():
                    result.append(inbox.record(c2, "g", rec))

            t = threading.Thread(target=second)
            t.start()
            try:
                with psycopg.connect(dsn, autocommit=True) as watch:
                    wait_for(
                        lambda pid2=pid2: watch.execute(
                            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                            (pid2,),
                        ).fetchone()[0],
                        30,
                        "the second to wait on the first",
                    )
                c1.commit() if first_commits else c1.rollback()
            finally:
                t.join(30)
            assert not t.is_alive()
            assert result == [second_gets]
            with psycopg.connect(dsn) as c:
                c.execute("DELETE FROM inbox_message")


def test_under_repeatable_read_a_concurrent_copy_fails_with_a_serialization_error(dsn):
    """docs/consuming.md: under REPEATABLE READ the second copy is not skipped quietly but fails
    (a serialization error: a failed attempt, retried), and its retry then skips it."""
    rec = stand_in("t", 0, 1)
    with psycopg.connect(dsn) as c1, psycopg.connect(dsn) as c2:
        c2.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        errors: list[BaseException] = []
        c1.execute("BEGIN")
        assert inbox.record(c1, "g", rec) is True
        pid2 = c2.info.backend_pid

        def second():
            try:
                with c2.transaction():
                    inbox.record(c2, "g", rec)
            except psycopg.Error as exc:
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()
        try:
            with psycopg.connect(dsn, autocommit=True) as watch:
                wait_for(
                    lambda: watch.execute(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                        (pid2,),
                    ).fetchone()[0],
                    30,
                    "the second to wait on the first",
                )
            c1.commit()
        finally:
            t.join(30)
        assert not t.is_alive()
        assert [type(e) for e in errors] == [psycopg.errors.SerializationFailure]
        with c2.transaction():  # the retry: a new snapshot sees the first copy's row
            assert inbox.record(c2, "g", rec) is False
        c2.execute("DELETE FROM inbox_message")
        c2.commit()


def test_purge_deletes_only_rows_older_than_the_window(dsn):
    with psycopg.connect(dsn) as c:
        c.execute("""
            INSERT INTO inbox_message (consumer_group, message_id, processed_at)
            SELECT g, gen_random_uuid(), now() - make_interval(days => d)
              FROM unnest(ARRAY['ledger', 'ledger', 'ledger', 'ledger', 'ledger', 'mail', 'mail'],
                          ARRAY[30, 20, 8, 6, 0, 9, 1]) AS t(g, d)""")

    def left():
        with psycopg.connect(dsn) as c:
            return sorted(
                c.execute(
                    "SELECT consumer_group, extract(day FROM now() - processed_at)"
                    "::int FROM inbox_message"
                ).fetchall()
            )

    week = dt.timedelta(days=7)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert inbox.count_old(conn, week, group="ledger") == 3
        assert inbox.purge_inbox(conn, week, group="ledger", batch_size=2) == 3
        assert left() == [("ledger", 0), ("ledger", 6), ("mail", 1), ("mail", 9)]
        assert inbox.purge_inbox(conn, dt.timedelta(days=5), max_batches=1, batch_size=1) == 1
        assert inbox.purge_inbox(conn, dt.timedelta(days=5)) == 1
        assert left() == [("ledger", 0), ("mail", 1)]
        with conn.transaction(), pytest.raises(InboxError, match="outside a transaction"):
            inbox.purge_inbox(conn, week)


def test_the_inbox_purge_command(dsn):
    with psycopg.connect(dsn) as c:
        c.execute(
            "INSERT INTO inbox_message (consumer_group, message_id, processed_at) "
            "SELECT g, gen_random_uuid(), now() - interval '10 days' "
            "FROM unnest(ARRAY['g', 'g', 'g', 'other']) AS g"
        )
        c.execute(
            "INSERT INTO inbox_message (consumer_group, message_id) VALUES ('g', gen_random_uuid())"
        )

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "relay", "inbox", "purge", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "OUTBOX_DSN": dsn},
        )

    dry = run("--older-than", "7d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "inbox purge: 4 rows of every group processed more than 7d ago" in dry.stdout
    done = run("--older-than", "7d", "--group", "g", "--yes")
    assert done.returncode == 0 and "inbox purge: 3 rows deleted" in done.stdout
    assert sorted(r[0] for r in inbox_rows(dsn)) == ["g", "other"]
    assert run("--older-than", "0s").returncode == 2


def test_sqlalchemy_session_records_in_its_transaction(dsn):
    from sqlalchemy.orm import Session

    from tests.integration.test_sqlalchemy import engine_for

    engine = engine_for(dsn)
    rec = stand_in("orders", 2, 40)
    try:
        with pytest.raises(RuntimeError), Session(engine) as s, s.begin():
            assert inbox.record_in_session(s, "billing", rec) is True
            raise RuntimeError("the handler failed")
        assert inbox_rows(dsn) == []
        with Session(engine) as s, s.begin():
            assert inbox.record_in_session(s, "billing", rec) is True
        with engine.begin() as conn:  # a Core connection
            assert inbox.record_in_session(conn, "billing", rec) is False
        assert inbox_rows(dsn) == [("billing", rec.headers()[0][1].decode(), "orders", 2, 40)]
    finally:
        engine.dispose()


def test_async_connection_records_in_its_transaction(dsn):
    rec = stand_in("orders", 0, 7)

    async def main():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            with pytest.raises(NotInTransaction, match="autocommit"):
                await inbox.arecord(conn, "g", rec)
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    assert await inbox.arecord(conn, "g", rec) is True
                    raise RuntimeError("the handler failed")
            assert inbox_rows(dsn) == []
            async with conn.transaction():
                assert await inbox.arecord(conn, "g", rec) is True
            async with conn.transaction():
                assert await inbox.arecord(conn, "g", rec) is False

    asyncio.run(main())
    assert len(inbox_rows(dsn)) == 1


def test_the_ledger_projection_example_applies_each_event_once(dsn, bootstrap):
    """examples/ledger_projection.py against the bank of examples/bank_transfer.py: the ledger
    equals the accounts after the events are consumed, and still after the relay sent every
    event again (`outbox replay`) and the consumer read them all a second time."""
    from tests.integration.test_docs import dsn_to_url

    env = {
        **os.environ,
        "OUTBOX_DSN": "postgresql://" + dsn_to_url(dsn),
        "OUTBOX_BOOTSTRAP_SERVERS": bootstrap,
    }

    def run(*args, timeout=120):
        result = subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
        )
        assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    bank, ledger = "examples/bank_transfer.py", "examples/ledger_projection.py"
    run(bank, "setup")
    run(ledger, "setup")
    out = run(bank, "transfer", "40")
    transfers = int(out.split()[0])
    events = 3 * transfers

    def deliver_and_project(processed: int, skipped: int) -> None:
        run("-m", "relay", "relay", "--once", "--no-listen")
        assert (
            run(ledger, "run", "--idle", "5")
            == f"{processed} events processed, {skipped} copies skipped (processed before)\n"
        )
        assert (
            f"{2 * transfers} ledger entries for {transfers} transfers; 0 accounts differ"
            in run(ledger, "check")
        )

    deliver_and_project(events, 0)
    replayed = run(
        "-m", "relay", "replay", "--status", "CONFIRMED", "--topic", "bank.events", "--yes"
    )
    assert f"replay: {events} messages back to PENDING" in replayed
    deliver_and_project(0, events)
