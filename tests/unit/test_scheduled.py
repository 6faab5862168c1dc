"""Scheduled delivery without services: the writer's checks, the in-memory store's promotion
on a fake clock, the promoter's rounds (bounded, stoppable), and the loop's order around a
promoted row."""

import datetime as dt
import fractions
import math
import threading
import time

import pytest

from outbox import InvalidMessage, build_message
from outbox.message import MAX_DELAY_SECONDS
from relay.promoter import Promoter
from relay.relay import Relay
from relay.testing import FakeClock, InMemoryStore, RecordingSink

UTC = dt.timezone.utc


# -- the writer's checks


def test_an_aware_deliver_at_or_a_delay_is_kept_on_the_message():
    at = dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    m = build_message(topic="t", payload={}, deliver_at=at)
    assert (m.deliver_at, m.delay) == (at, None)
    assert build_message(topic="t", payload={}, delay=2).delay == 2.0
    assert build_message(topic="t", payload={}, delay=1.5).delay == 1.5
    assert build_message(topic="t", payload={}, delay=dt.timedelta(minutes=2)).delay == 120.0
    assert build_message(topic="t", payload={}, delay=0).delay == 0.0
    plain = build_message(topic="t", payload={})
    assert (plain.deliver_at, plain.delay) == (None, None)


def test_a_deliver_at_without_a_time_zone_is_refused_with_one_clear_error():
    with pytest.raises(InvalidMessage, match="has no time zone"):
        build_message(topic="t", payload={}, deliver_at=dt.datetime(2030, 1, 1, 10, 0))


class NoOffset(dt.tzinfo):
    """A tzinfo whose utcoffset() is None: naive as far as Python is concerned."""

    def utcoffset(self, _):
        return None


def test_a_tzinfo_without_an_offset_counts_as_naive():
    with pytest.raises(InvalidMessage, match="has no time zone"):
        build_message(topic="t", payload={}, deliver_at=dt.datetime(2030, 1, 1, tzinfo=NoOffset()))


@pytest.mark.parametrize(
    "delay",
    [
        -1,
        -0.001,
        math.nan,
        math.inf,
        -math.inf,
        1e12,
        dt.timedelta(seconds=-1),
        MAX_DELAY_SECONDS + 1,
    ],
)
def test_a_negative_non_finite_or_absurd_delay_is_refused(delay):
    with pytest.raises(InvalidMessage, match="delay must be"):
        build_message(topic="t", payload={}, delay=delay)


@pytest.mark.parametrize(
    "deliver_at",
    [
        dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5))),
        dt.datetime(9999, 12, 31, 23, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        dt.datetime(2300, 1, 1, tzinfo=UTC),
        dt.datetime(1800, 1, 1, tzinfo=UTC),
    ],
)
def test_a_deliver_at_a_century_or_more_away_is_refused_before_the_database(deliver_at):
    with pytest.raises(InvalidMessage, match="more than 100 years from now"):
        build_message(topic="t", payload={}, deliver_at=deliver_at)


def test_any_real_number_is_a_delay():
    message = build_message(topic="t", payload={}, delay=fractions.Fraction(3, 2))
    assert message.delay == 1.5


def test_deliver_at_and_delay_together_are_refused():
    with pytest.raises(InvalidMessage, match="not both"):
        build_message(topic="t", payload={}, delay=1, deliver_at=dt.datetime.now(UTC))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"deliver_at": "2030-01-01T00:00Z"}, "deliver_at must be a datetime"),
        ({"deliver_at": dt.date(2030, 1, 1)}, "deliver_at must be a datetime"),
        ({"deliver_at": 1700000000}, "deliver_at must be a datetime"),
        ({"delay": "5"}, "delay must be a datetime.timedelta or a number"),
        ({"delay": True}, "delay must be a datetime.timedelta or a number"),
    ],
)
def test_wrong_types_are_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        build_message(topic="t", payload={}, **kwargs)


def test_publish_many_names_the_item_that_is_refused():
    from outbox.writer import build_all

    with pytest.raises(InvalidMessage, match=r"message #1: deliver_at .* has no time zone"):
        build_all(
            [
                {"topic": "t", "payload": {}},
                {"topic": "t", "payload": {}, "deliver_at": dt.datetime(2030, 1, 1)},
            ],
            1_000_000,
        )


# -- the in-memory store on a fake clock


def test_the_store_promotes_due_rows_earliest_first_in_bounded_batches():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    now = clock.now
    late = store.insert("t", b"k", b"late", deliver_at=now + 20)
    early = [store.insert("t", b"k", b"%d" % i, deliver_at=now + 10) for i in range(3)]
    at_once = store.insert("t", b"k", b"past", deliver_at=now - 1)
    assert at_once.status == "PENDING"
    assert {r.status for r in [late, *early]} == {"SCHEDULED"}
    assert store.scheduled_count() == 4 and store.next_due() == 10
    assert store.promote_due(10) == 0 and store.wakeups == 0  # nothing due yet
    clock.advance(10)
    assert store.next_due() == 0
    assert store.promote_due(2) == 2  # the bound
    assert [r.status for r in early] == ["PENDING", "PENDING", "SCHEDULED"]
    assert store.promote_due(2) == 1 and late.status == "SCHEDULED"
    assert store.wakeups == 2
    assert store.next_due() == 10 and store.scheduled_count() == 1
    clock.advance(10)
    assert store.promote_due(2) == 1 and store.next_due() is None


def test_a_scheduled_row_holds_nothing_back_and_takes_its_place_by_id_when_due():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    relay = Relay(store, RecordingSink(), reader=store, clock=clock)
    reminder = store.insert("t", b"acct", b"reminder", deliver_at=clock.now + 60)
    refund = store.insert("t", b"acct", b"refund")
    relay.run_once()
    assert refund.status == "CONFIRMED"
    assert [m.payload for m in relay.sink.sent] == [b"refund"]  # not held by the reminder
    assert reminder.status == "SCHEDULED"
    clock.advance(60)
    store.insert("t", b"acct", b"later")
    assert store.promote_due(100) == 1
    relay.run_once()
    # Among the key's rows still waiting it goes by id: before `later`, after `refund`.
    assert [m.payload for m in relay.sink.sent] == [b"refund", b"reminder", b"later"]
    assert relay.stats["order_inversions"] == 0


# -- the promoter


def test_a_round_is_bounded_and_the_promoter_goes_on_at_once_while_more_are_due():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    for i in range(25):
        store.insert("t", None, b"%d" % i, deliver_at=clock.now + 1)
    clock.advance(1)
    promoter = Promoter(store, batch=4, rounds=3, clock=clock)
    n = promoter.run_once()
    assert n == 12 and promoter.next_wait(n) == 0.0
    assert promoter.run_once() == 12
    n = promoter.run_once()
    assert n == 1 and promoter.next_wait(n) == promoter.interval  # nothing scheduled left


def test_it_sleeps_until_the_next_due_time_capped_at_its_interval_and_floored():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    promoter = Promoter(store, interval=1.0, min_wait=0.05, clock=clock)
    assert promoter.next_wait(0) == 1.0  # nothing scheduled: the interval
    store.insert("t", None, b"x", deliver_at=clock.now + 0.3)
    assert promoter.next_wait(0) == pytest.approx(0.3)
    store.insert("t", None, b"y", deliver_at=clock.now + 0.001)
    assert promoter.next_wait(0) == 0.05  # never a busy loop on rows it cannot take
    clock.advance(100)
    assert promoter.next_wait(0) == 0.05


class FailsOnce(InMemoryStore):
    def __init__(self, now):
        super().__init__(now)
        self.calls = 0

    def promote_due(self, limit):
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("the database is restarting")
        return super().promote_due(limit)


def test_run_outlives_a_failed_round_reports_the_count_and_ends_on_the_stop_event():
    clock = FakeClock()
    store = FailsOnce(clock.monotonic)
    for i in range(3):
        store.insert("t", None, b"%d" % i, deliver_at=clock.now + 0.5)
    counts = []
    stop = threading.Event()
    promoter = Promoter(store, interval=1.0, clock=clock, on_count=counts.append)
    original = clock.wait

    def wait(event, seconds):
        if len(clock.waits) == 3:
            event.set()
        return original(event, seconds)

    clock.wait = wait
    promoter.run(stop)
    # failed (waits the interval), promoted 3 (nothing left: the interval), then twice more
    assert clock.waits == [1.0, 1.0, 1.0, 1.0]
    assert promoter.promoted == 3 and store.calls == 4
    assert counts[0] == 0


def test_start_runs_it_on_a_thread_that_the_stop_event_ends_promptly():
    store = InMemoryStore(time.monotonic)
    row = store.insert("t", None, b"x", deliver_at=time.monotonic() + 0.2)
    stop = threading.Event()
    promoter = Promoter(store, interval=30.0)
    thread = promoter.start(stop)
    deadline = time.monotonic() + 10
    while row.status != "PENDING" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert row.status == "PENDING"  # woke at the due time, not after the 30 s interval
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_round_stops_between_batches_once_told_to():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    for i in range(10):
        store.insert("t", None, b"%d" % i, deliver_at=clock.now + 1)
    clock.advance(1)
    stop = threading.Event()
    stop.set()
    assert Promoter(store, batch=2, clock=clock).run_once(stop) == 0
    assert Promoter(store, batch=2, clock=clock).run_once(threading.Event()) == 10
