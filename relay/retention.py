"""Retention: old CONFIRMED rows deleted beside the relay loop, never in its way.

As River runs its job cleaner as a maintenance service of its own beside the fetch loop,
retention runs on its own thread with its own database connection: a round of deletes never
delays a batch (or its latency), and a slow batch never delays retention. Any later
housekeeping belongs here too, not in relay.relay.
"""

from __future__ import annotations

import logging
import threading

from .clock import Clock, SystemClock
from .model import Store

log = logging.getLogger(__name__)


class Retention:
    """Deletes CONFIRMED rows created over OLDER_THAN_SECONDS ago: every INTERVAL seconds, up
    to ROUNDS batches of BATCH rows, each its own short statement (short locks; rows another
    relay is deleting are skipped, not waited for: queries.sql's delete_confirmed)."""

    def __init__(
        self,
        store: Store,
        older_than_seconds: float,
        *,
        batch: int = 1000,
        interval: float = 60.0,
        rounds: int = 100,
        clock: Clock | None = None,
    ):
        if older_than_seconds <= 0:
            raise ValueError("retention needs a positive age")
        self.store = store
        self.older_than_seconds = older_than_seconds
        self.batch, self.interval, self.rounds = batch, interval, rounds
        self.clock = clock or SystemClock()
        self.deleted = 0

    def run_once(self, stop: threading.Event | None = None) -> int:
        """One round (cut short when STOP is set); how many rows it deleted."""
        deleted = 0
        for _ in range(self.rounds):  # bounded: a backlog is worked off round by round
            if stop is not None and stop.is_set():
                break
            n = self.store.delete_confirmed(self.older_than_seconds, self.batch)
            deleted += n
            if n < self.batch:
                break
        if deleted:
            log.info(
                "retention: deleted %d CONFIRMED rows older than %gs",
                deleted,
                self.older_than_seconds,
            )
        self.deleted += deleted
        return deleted

    def run(self, stop: threading.Event) -> None:
        """A round every interval until STOP is set. A failed round (the database restarting)
        is logged and tried again at the next one: retention never stops the relay."""
        while not stop.is_set():
            try:
                self.run_once(stop)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("retention round failed (next in %gs): %s", self.interval, exc)
            if self.clock.wait(stop, self.interval):
                break

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="retention", daemon=True)
        thread.start()
        return thread
