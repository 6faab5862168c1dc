"""The inbox and InboxConsumer without services: the flow, message ids, the order of commit and
stored offset, retries, the rewind after a failure, bounded loops (fakes in inbox_fakes.py)."""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid

import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox import HandlerFailed, InboxError, NotInTransaction, inbox
from outbox.consumer import InboxConsumer, check_poll_interval, consumer_settings
from tests.unit.inbox_fakes import FakeConnection, FakeConsumer, FakeMessage, message

T = "ledger.events"


def make(records, handler=None, *, events=None, conn=None, **kwargs):
    """An InboxConsumer on fakes; WAITS records the backoff waits asked for."""
    events = events if events is not None else []
    fake = FakeConsumer(records, events)
    conn = conn if conn is not None else FakeConnection(events)
    waits: list[float] = []
    kwargs.setdefault("wait", lambda s: waits.append(s) or False)
    if "connect" not in kwargs:
        kwargs["conn"] = conn
    consumer = InboxConsumer(
        None,
        [T],
        handler or (lambda c, m: c.effect(m.offset())),
        group="ledger",
        consumer=fake,
        **kwargs,
    )
    return consumer, fake, conn, waits


# --------------------------------------------------------------------------- the flow


def test_the_flow_is_one_insert_and_says_whether_a_row_came_back():
    entry = inbox.InboxEntry("g", uuid.uuid4(), T, 2, 17)
    for rows, new in (([(1,)], True), ([], False)):
        flow = inbox.record_flow(entry)
        step = next(flow)
        assert (step.name, step.file) == ("record_message", "inbox.sql")
        assert step.params == {
            "group": "g",
            "message_id": entry.message_id,
            "topic": T,
            "partition": 2,
            "offset": 17,
        }
        with pytest.raises(StopIteration) as done:
            flow.send(rows)
        assert done.value.value is new


def test_the_message_id_header_as_the_relay_sends_it():
    mid = uuid.uuid4()
    entry = inbox.inbox_entry("g", message(T, 1, 5, mid))
    assert (entry.group, entry.message_id, entry.topic, entry.partition, entry.offset) == (
        "g",
        mid,
        T,
        1,
        5,
    )


@pytest.mark.parametrize(
    "headers, problem",
    [
        ([], "has no message_id header"),
        (None, "has no message_id header"),
        ([("other", b"x")], "has no message_id header"),
        ([("message_id", b"not-a-uuid")], "its message_id header is b'not-a-uuid', not a UUID"),
        ([("message_id", None)], "its message_id header is None, not a UUID"),
        ([("message_id", b"\xff" * 200)], "..., not a UUID"),
        (
            [
                ("message_id", str(uuid.uuid4()).encode()),
                ("message_id", str(uuid.uuid4()).encode()),
            ],
            "has 2 different message_id headers",
        ),
    ],
)
def test_a_record_without_a_valid_message_id_is_refused_by_name(headers, problem):
    with pytest.raises(InboxError) as caught:
        inbox.inbox_entry("g", FakeMessage(T, 1, 5, headers))
    assert str(caught.value).startswith(f"record topic '{T}' partition 1 offset 5")
    assert problem in str(caught.value)
    assert (caught.value.topic, caught.value.partition, caught.value.offset) == (T, 1, 5)


def test_the_same_header_twice_is_one_id():
    mid = str(uuid.uuid4()).encode()
    assert inbox.message_id_of(FakeMessage(T, 0, 0, [("message_id", mid)] * 2)) == uuid.UUID(
        mid.decode()
    )


def test_records_of_other_producers_get_their_id_from_a_function():
    namespace = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")
    rec = FakeMessage(T, 0, 3, [], b"order-42")
    by_uuid = inbox.inbox_entry("g", rec, lambda r: uuid.uuid5(namespace, r.value().decode()))
    assert by_uuid.message_id == uuid.uuid5(namespace, "order-42")
    fixed = "0192d3c4-0000-7000-8000-000000000001"
    assert inbox.inbox_entry("g", rec, lambda r: fixed).message_id == uuid.UUID(fixed)
    with pytest.raises(InboxError, match="offset 3: the message_id function returned 42"):
        inbox.inbox_entry("g", rec, lambda r: 42)
    with pytest.raises(InboxError, match="the message_id function failed: KeyError"):
        inbox.inbox_entry("g", rec, lambda r: {}["id"])


def test_an_error_event_and_a_bad_group_are_refused():
    err = FakeMessage(T, 0, 1, None, b"", KafkaError(KafkaError._PARTITION_EOF))
    with pytest.raises(InboxError, match="is a Kafka error event"):
        inbox.inbox_entry("g", err)
    with pytest.raises(InboxError, match="must not be empty"):
        inbox.inbox_entry("", message(T, 0, 0))
    with pytest.raises(TypeError, match="must be a str"):
        inbox.inbox_entry(b"g", message(T, 0, 0))


def test_record_refuses_where_the_row_would_commit_on_its_own():
    conn = FakeConnection(autocommit=True)
    with pytest.raises(NotInTransaction, match=r"outbox.inbox.record\(\) needs a transaction"):
        inbox.record(conn, "g", message(T, 0, 0))
    conn = FakeConnection()
    with conn.transaction():
        conn.fail()
        with pytest.raises(NotInTransaction, match="before recording a message in the inbox"):
            inbox.record(conn, "g", message(T, 0, 0))
    assert conn.inbox == {}


def test_record_in_a_transaction_is_true_once():
    conn, rec = FakeConnection(), message(T, 0, 0)
    with conn.transaction():
        assert inbox.record(conn, "g", rec) is True
        assert inbox.record(conn, "g", rec) is False
    with conn.transaction():
        assert inbox.record(conn, "g", rec) is False
        assert inbox.record(conn, "other", rec) is True


# --------------------------------------------------------------------------- the consumer


def test_each_record_commits_then_its_offset_is_stored():
    records = [message(T, 0, o) for o in range(3)]
    consumer, fake, conn, _ = make(records)
    assert consumer.run(max_messages=3) == 3
    assert conn.effects == [0, 1, 2]
    assert fake.subscribed == [T]
    kinds = [e[0] for e in fake.events]
    assert kinds == ["commit", "store"] * 3
    assert fake.stored == {(T, 0): 3}


def test_a_message_delivered_twice_runs_the_handler_once():
    mid = uuid.uuid4()
    records = [message(T, 0, 0, mid), message(T, 0, 1), message(T, 0, 2, mid)]
    consumer, fake, conn, _ = make(records)
    results = [consumer.poll_once(0) for _ in range(3)]
    assert [r.new for r in results] == [True, True, False]
    assert results[2].message_id == mid and results[2].offset == 2
    assert conn.effects == [0, 1]
    assert fake.stored == {(T, 0): 3}, "the skipped copy's offset is stored too"


def test_a_failing_handler_is_retried_with_capped_backoff_and_commits_once():
    calls = []

    def handler(conn, msg):
        calls.append(msg.offset())
        conn.effect(msg.offset())
        if len(calls) < 4:
            raise RuntimeError("deadlock detected")

    consumer, fake, conn, waits = make(
        [message(T, 0, 0)], handler, max_attempts=5, backoff=1.0, max_backoff=3.0
    )
    handled = consumer.poll_once(0)
    assert handled.new and calls == [0, 0, 0, 0]
    assert waits == [1.0, 2.0, 3.0]
    assert conn.effects == [0], "the failed attempts' writes rolled back"
    assert fake.stored == {(T, 0): 1}


def test_backoff_doubles_up_to_its_cap():
    consumer, *_ = make([], max_attempts=8, backoff=1.0, max_backoff=5.0)
    assert consumer.backoff_delays() == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    consumer, *_ = make([], max_attempts=1)
    assert consumer.backoff_delays() == []


def test_after_max_attempts_the_record_is_unrecorded_unstored_and_next():
    """The loss this prevents: record 1 fails, record 2 succeeds and stores offset 3, the
    commit goes past 1. After the failure the partition is rewound to 1, and nothing after it
    is handled or stored before it is done."""
    broken = {"on": True}

    def handler(conn, msg):
        if msg.offset() == 1 and broken["on"]:
            raise ValueError("bad ledger state")
        conn.effect(msg.offset())

    records = [message(T, 0, o) for o in range(3)] + [message(T, 1, 0)]
    consumer, fake, conn, waits = make(records, handler, max_attempts=3)
    with pytest.raises(HandlerFailed) as caught:
        consumer.run()
    err = caught.value
    assert (err.topic, err.partition, err.offset) == (T, 0, 1)
    assert f"record topic '{T}' partition 0 offset 1" in str(err)
    assert "failed 3 time(s), the last with ValueError: bad ledger state" in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert waits == [0.5, 1.0]
    assert conn.effects == [0]
    assert list(conn.inbox.values()) == [(T, 0, 0)], "no inbox row for offset 1"
    assert fake.stored == {(T, 0): 1}, "offset 1 is not stored"
    assert fake.seeks == [(T, 0, 1)]

    broken["on"] = False  # the handler is fixed; the same consumer goes on
    assert consumer.run(max_messages=3) == 3
    assert conn.effects == [0, 1, 2, 0]
    stores = [(e[2], e[3]) for e in fake.events if e[0] == "store"]
    assert stores == [(0, 0), (0, 1), (0, 2), (1, 0)]
    consumer.close()
    assert fake.committed == {(T, 0): 3, (T, 1): 1}


def test_a_record_without_a_message_id_stops_at_once_with_nothing_written():
    records = [message(T, 0, 0), FakeMessage(T, 0, 1, []), message(T, 0, 2)]
    handled = []
    consumer, fake, conn, waits = make(records, lambda c, m: handled.append(m.offset()))
    with pytest.raises(
        InboxError, match=f"record topic '{T}' partition 0 offset 1 has no message_id header"
    ) as caught:
        consumer.run()
    assert not isinstance(caught.value, HandlerFailed)
    assert handled == [0] and waits == [], "bad input is not retried"
    assert len(conn.inbox) == 1
    assert fake.stored == {(T, 0): 1} and fake.seeks == [(T, 0, 1)]
    with pytest.raises(InboxError):  # it stays next: no later record goes past it
        consumer.poll_once(0)
    assert handled == [0] and fake.stored == {(T, 0): 1}


def test_stop_during_a_backoff_leaves_the_record_for_next_time():
    def handler(conn, msg):
        raise RuntimeError("database is starting up")

    consumer, fake, conn, _ = make(
        [message(T, 0, 0), message(T, 0, 1)], handler, wait=lambda s: consumer.stop() or True
    )
    assert consumer.run() == 0
    assert fake.stored == {} and fake.seeks == [(T, 0, 0)] and conn.inbox == {}
    assert fake.position[(T, 0)] == 0


def test_a_handler_that_swallows_a_database_error_does_not_count_as_done():
    def handler(conn, msg):
        conn.effect("written before the error")
        conn.fail()  # a statement failed; the handler caught it and returned

    consumer, fake, conn, _ = make([message(T, 0, 0)], handler, max_attempts=2)
    with pytest.raises(HandlerFailed, match="left the transaction failed"):
        consumer.poll_once(0)
    assert conn.effects == [] and conn.inbox == {} and fake.stored == {}


def test_a_connection_left_in_a_transaction_is_refused():
    conn = FakeConnection()
    conn.status = psycopg.pq.TransactionStatus.INTRANS
    consumer, fake, _, _ = make([message(T, 0, 0)], conn=conn, max_attempts=1)
    with pytest.raises(HandlerFailed, match="has a transaction open"):
        consumer.poll_once(0)
    assert fake.stored == {}


def test_a_broken_connection_from_connect_is_replaced():
    made: list[FakeConnection] = []

    def connect():
        made.append(FakeConnection())
        if len(made) == 1:
            made[0].fail_executes = 1
        return made[-1]

    consumer, fake, _, waits = make([message(T, 0, 0)], connect=connect)
    assert consumer.poll_once(0).new
    assert len(made) == 2 and made[0].closed and waits == [0.5]
    assert made[1].effects == [0]
    consumer.close()
    assert made[1].closed and fake.closed


def test_a_given_connection_is_never_closed_by_the_consumer():
    consumer, fake, conn, _ = make([message(T, 0, 0)])
    consumer.run(max_messages=1)
    consumer.close()
    consumer.close()
    assert fake.closed and not conn.closed


def test_an_offset_that_cannot_be_stored_is_logged_not_raised(caplog):
    consumer, fake, conn, _ = make([message(T, 0, 0)])
    fake.store_fails = True
    with caplog.at_level(logging.WARNING, "outbox.inbox"):
        assert consumer.poll_once(0).new
    assert conn.effects == [0]
    assert "offset not stored" in caplog.text and "comes again and is skipped" in caplog.text


def test_kafka_errors_fatal_raise_others_are_logged_once_a_minute(caplog):
    now = [0.0]
    consumer, fake, _, _ = make([], clock=lambda: now[0])
    fake.errors = [KafkaError(KafkaError._TRANSPORT, "broker down")] * 3
    with caplog.at_level(logging.WARNING, "outbox.inbox"):
        assert consumer.poll_once(0) is None
        assert consumer.poll_once(0) is None
        now[0] = 61.0
        assert consumer.poll_once(0) is None
    assert caplog.text.count("broker down") == 2
    fake.errors = [KafkaError(KafkaError._FATAL, "fenced", fatal=True)]
    with pytest.raises(KafkaException):
        consumer.poll_once(0)


def test_run_is_bounded_by_messages_time_and_stop():
    records = [message(T, 0, o) for o in range(10)]
    consumer, fake, _conn, _ = make(records)
    assert consumer.run(max_messages=4) == 4

    now = [0.0]
    consumer, fake, _, _ = make([], clock=lambda: now[0])
    timeouts = []

    def on_poll(timeout):
        timeouts.append(timeout)
        now[0] += timeout

    fake.on_poll = on_poll
    assert consumer.run(timeout=2.5, poll_timeout=1.0) == 0
    assert timeouts == [1.0, 1.0, 0.5], "no wait goes past the deadline"

    consumer, fake, _conn, _ = make(records, lambda c, m: consumer.stop())
    assert not consumer.stopped
    assert consumer.run() == 1
    assert consumer.stopped and fake.stored == {(T, 0): 1}


def test_retention_runs_for_the_group_at_its_interval(monkeypatch):
    import datetime as dt

    calls = []
    monkeypatch.setattr(
        inbox, "purge_inbox", lambda conn, older, **kw: calls.append((older, kw)) or 0
    )
    now = [0.0]
    consumer, fake, _, _ = make(
        [], clock=lambda: now[0], retention=dt.timedelta(days=7), retention_interval=60
    )
    fake.on_poll = lambda timeout: now.__setitem__(0, now[0] + timeout)
    consumer.run(timeout=150, poll_timeout=10)
    assert [c[0] for c in calls] == [dt.timedelta(days=7)] * 3  # at 0, 60 and 120 s
    assert calls[0][1]["group"] == "ledger" and calls[0][1]["max_batches"] == 10


# --------------------------------------------------------------------------- settings


def test_settings_store_offsets_after_the_commit_and_keep_auto_commit():
    settings = consumer_settings({"bootstrap.servers": "k:9092", "group.id": "ledger"})
    assert settings["enable.auto.offset.store"] is False
    assert "enable.auto.commit" not in settings  # librdkafka's default: true
    with pytest.raises(InboxError, match=re.escape("enable.auto.offset.store=true would store")):
        consumer_settings({"enable.auto.offset.store": "true"})
    with pytest.raises(InboxError, match=re.escape("enable.auto.commit=false")):
        consumer_settings({"enable.auto.commit": False})


def test_backoff_must_end_well_within_the_poll_interval():
    check_poll_interval({}, [0.5, 1, 2, 4])
    with pytest.raises(
        InboxError, match=re.escape("add up to 200s, over half of max.poll.interval.ms")
    ):
        check_poll_interval({"max.poll.interval.ms": "300000"}, [100, 100])


def test_the_consumer_needs_a_group_and_one_connection():
    with pytest.raises(InboxError, match="no consumer group"):
        InboxConsumer({"bootstrap.servers": "k:9092"}, [T], print, conn=FakeConnection())
    with pytest.raises(TypeError, match="exactly one of conn="):
        InboxConsumer({"group.id": "g"}, [T], print)
    with pytest.raises(TypeError, match="exactly one of conn="):
        InboxConsumer({"group.id": "g"}, [T], print, conn=FakeConnection(), connect=list)


def test_a_failed_rewind_of_a_partition_still_assigned_stops_the_consumer():
    """A record given up on must stay next: if its partition cannot be sought back while it
    is still ours, the next poll would hand out later records and store past it."""

    def handler(conn, msg):
        if msg.offset() == 1:
            raise RuntimeError("ledger is locked")
        conn.effect(msg.offset())

    records = [message(T, 0, 0), message(T, 0, 1), message(T, 0, 2)]
    consumer, fake, _conn, _ = make(records, handler, max_attempts=2)
    fake.seek_fails = True
    with pytest.raises(InboxError, match="could not rewind its partition") as caught:
        consumer.run()
    assert caught.value.offset == 1
    assert consumer.stopped
    assert fake.stored == {(T, 0): 1}, "nothing stored past the record given up on"


def test_a_failed_rewind_of_a_partition_no_longer_assigned_is_left_to_its_next_owner():
    def handler(conn, msg):
        raise RuntimeError("ledger is locked")

    consumer, fake, _conn, _ = make([message(T, 0, 0)], handler, max_attempts=1)
    fake.seek_fails = True
    fake.revoked.add((T, 0))
    with pytest.raises(HandlerFailed):
        consumer.poll_once(0)
    assert not consumer.stopped and fake.stored == {}


@pytest.mark.parametrize("value", ["1", "t", "TRUE", "yes", "on", True])
def test_every_spelling_of_true_for_auto_offset_store_is_refused(value):
    with pytest.raises(InboxError, match=re.escape("enable.auto.offset.store=true")):
        consumer_settings({"enable.auto.offset.store": value})


@pytest.mark.parametrize("value", ["0", "f", "false", "no", "off", False])
def test_every_spelling_of_false_for_auto_commit_is_refused(value):
    with pytest.raises(InboxError, match=re.escape("enable.auto.commit=false")):
        consumer_settings({"enable.auto.commit": value})


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"retention": dt.timedelta(0)}, "retention must be a positive timedelta"),
        ({"retention": dt.timedelta(days=-1)}, "retention must be a positive timedelta"),
        ({"retention_interval": 0}, "retention_interval must be positive"),
    ],
)
def test_retention_settings_are_checked_at_start(kwargs, error):
    with pytest.raises(ValueError, match=error):
        make([], **kwargs)
