"""Retention as a service beside the loop: rounds of small batches, every interval, until
stopped, surviving a failed round."""

import datetime as dt
import threading
import time

from relay.retention import Retention
from relay.testing import FakeClock, InMemoryStore


def old_confirmed(store: InMemoryStore, n: int, days: float = 2.0) -> None:
    for _ in range(n):
        row = store.insert("t", None, b"{}")
        row.status = "CONFIRMED"
        row.created_at -= dt.timedelta(days=days)


def test_a_round_deletes_old_confirmed_rows_in_batches_up_to_its_bound():
    store = InMemoryStore(time.monotonic)
    old_confirmed(store, 25)
    old_confirmed(store, 3, days=0)  # too young
    store.insert("t", None, b"{}").created_at -= dt.timedelta(days=5)  # PENDING: kept
    retention = Retention(store, 86400.0, batch=4, rounds=3)
    assert retention.run_once() == 12  # three batches of four, then the round ends
    assert retention.run_once() == 12
    assert retention.run_once() == 1
    assert retention.run_once() == 0
    assert sorted(r.status for r in store.rows.values()) == ["CONFIRMED"] * 3 + ["PENDING"]


class FailsOnce(InMemoryStore):
    def __init__(self):
        super().__init__(time.monotonic)
        self.calls = 0

    def delete_confirmed(self, older_than_seconds, limit):
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("the database is restarting")
        return super().delete_confirmed(older_than_seconds, limit)


def test_it_runs_every_interval_until_stopped_and_outlives_a_failed_round():
    store = FailsOnce()
    old_confirmed(store, 5)
    clock = FakeClock()
    stop = threading.Event()
    retention = Retention(store, 86400.0, interval=60.0, clock=clock)
    # The fake clock returns at once from each wait; stop after the third.
    original = clock.wait

    def wait(event, seconds):
        if len(clock.waits) == 2:
            event.set()
        return original(event, seconds)

    clock.wait = wait
    retention.run(stop)
    assert clock.waits == [60.0, 60.0, 60.0]
    assert retention.deleted == 5 and store.calls == 3  # failed, deleted 5, found none


def test_start_runs_it_on_a_thread_that_the_stop_event_ends():
    store = InMemoryStore(time.monotonic)
    old_confirmed(store, 2)
    stop = threading.Event()
    retention = Retention(store, 86400.0, interval=30.0)
    thread = retention.start(stop)
    deadline = time.monotonic() + 10
    while retention.deleted < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=10)
    assert retention.deleted == 2 and not thread.is_alive()


def test_a_round_stops_between_batches_once_told_to():
    store = InMemoryStore(time.monotonic)
    old_confirmed(store, 10)
    stop = threading.Event()
    stop.set()
    assert Retention(store, 86400.0, batch=2).run_once(stop) == 0
    assert Retention(store, 86400.0, batch=2).run_once(threading.Event()) == 10
