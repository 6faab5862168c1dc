"""Scheduled delivery: SCHEDULED rows made PENDING when they fall due, beside the relay loop.

A row written with a due time still ahead (`publish(..., deliver_at=...)` or `delay=`) is
SCHEDULED: outside the PENDING index the relay reads, so that rows due next month cost its
read nothing. The promoter, like relay.retention, runs on its own thread with its own
connection: it promotes the due rows in bounded batches (each one short statement that skips
rows another relay's promoter holds), wakes the idle relays (NOTIFY) when it promoted any,
then sleeps until the next due time, at most `interval` seconds. A row is therefore read at
most about `interval` seconds after it falls due, plus the relay's own read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .clock import Clock, SystemClock
from .model import Store

log = logging.getLogger(__name__)


class Promoter:
    """Promotes due SCHEDULED rows: per round up to ROUNDS statements of BATCH rows; between
    rounds it waits until the next row falls due, at most INTERVAL seconds (new scheduled rows
    are seen at the latest then), at least MIN_WAIT when nothing it could take was due (rows
    locked by another promoter, or by an operator's skip, are not waited for in a busy loop).
    ON_COUNT, if given, is told how many rows are SCHEDULED every STATS_INTERVAL seconds
    (the outbox_scheduled_messages gauge)."""

    def __init__(
        self,
        store: Store,
        *,
        batch: int = 1000,
        rounds: int = 10,
        interval: float = 1.0,
        min_wait: float = 0.05,
        stats_interval: float = 60.0,
        on_count: Callable[[int], None] | None = None,
        clock: Clock | None = None,
    ):
        if batch < 1 or rounds < 1 or interval <= 0 or min_wait < 0:
            raise ValueError("the promoter needs a positive batch, rounds and interval")
        self.store = store
        self.batch, self.rounds = batch, rounds
        self.interval, self.min_wait = interval, min(min_wait, interval)
        self.stats_interval = stats_interval
        self.on_count = on_count
        self.clock = clock or SystemClock()
        self.promoted = 0
        self._counted_at: float | None = None

    def run_once(self, stop: threading.Event | None = None) -> int:
        """One round (cut short when STOP is set); how many rows it promoted."""
        promoted = 0
        for _ in range(self.rounds):  # bounded: a backlog of due rows is worked off by rounds
            if stop is not None and stop.is_set():
                break
            n = self.store.promote_due(self.batch)
            promoted += n
            if n < self.batch:
                break
        if promoted:
            log.info("promoted %d scheduled rows that fell due", promoted)
        self.promoted += promoted
        return promoted

    def next_wait(self, promoted: int) -> float:
        """How long to sleep after a round that promoted PROMOTED rows."""
        if promoted >= self.batch * self.rounds:
            return 0.0  # the round stopped at its bound with more due: go on at once
        due_in = self.store.next_due()
        if due_in is None:
            return self.interval
        return min(self.interval, max(self.min_wait, due_in))

    def _count_if_due(self) -> None:
        now = self.clock.monotonic()
        if self.on_count is None:
            return
        if self._counted_at is None or now - self._counted_at >= self.stats_interval:
            self._counted_at = now
            self.on_count(self.store.scheduled_count())

    def run(self, stop: threading.Event) -> None:
        """Rounds until STOP is set. A failed round (the database restarting) is logged and
        tried again after INTERVAL: the promoter never stops the relay."""
        failures = 0
        while not stop.is_set():
            try:
                wait = self.next_wait(self.run_once(stop))
                self._count_if_due()
                if failures:
                    log.info("promoting scheduled rows works again (%d rounds failed)", failures)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                failures += 1
                # The first failure, then one line a minute while it lasts: not 86,400 a day.
                if failures == 1 or failures % max(1, round(60 / self.interval)) == 0:
                    log.warning(
                        "promoting scheduled rows failed (%d rounds so far, next in %gs): %s",
                        failures,
                        self.interval,
                        exc,
                    )
                wait = self.interval
            if self.clock.wait(stop, wait):
                break

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="promoter", daemon=True)
        thread.start()
        return thread
