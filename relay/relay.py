"""The relay loop: lease buckets -> read pending rows -> produce -> await reports -> record.

One thread, one database connection for queries (plus one for LISTEN), one producer. A batch is
read in a short autocommit statement, sent, and its outcomes recorded in two more statements;
no transaction is ever open while the relay waits on Kafka.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from .clock import Clock, SystemClock
from .kafka import Sink
from .model import Delivered, Failed, FailureKind, Outcome
from .retry import NO_WRITE, CircuitBreaker, RetryPolicy
from .store import Store

log = logging.getLogger(__name__)


class Relay:
    def __init__(
        self,
        store: Store,
        sink: Sink,
        *,
        name: str = "relay",
        batch_size: int = 2000,
        lease_seconds: float = 90.0,
        heartbeat_interval: float = 10.0,
        flush_timeout: float = 35.0,
        idle_poll_interval: float = 1.0,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        wait_for_work: Callable[[float], None] | None = None,
    ):
        self.store = store
        self.sink = sink
        self.relay_id = uuid.uuid4()
        self.name = name
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.heartbeat_interval = heartbeat_interval
        self.flush_timeout = flush_timeout
        self.idle_poll_interval = idle_poll_interval
        self.retry = retry or RetryPolicy()
        self.clock = clock or SystemClock()
        self.breaker = CircuitBreaker()
        # Blocks up to N seconds or until new rows are announced (LISTEN); None: plain wait.
        self._wait_for_work = wait_for_work
        self.buckets: frozenset[int] = frozenset()
        self._lease_valid_until = float("-inf")
        self._next_heartbeat = float("-inf")
        self.stats = {"delivered": 0, "failed": 0, "retried": 0, "batches": 0,
                      "order_inversions": 0}
        self._alone: set[int] = set()
        self.last_progress = self.clock.monotonic()

    # -- leases

    def _heartbeat_if_due(self) -> None:
        now = self.clock.monotonic()
        # Produce only while the lease outlives every message this batch could leave in flight.
        if now < self._next_heartbeat and now + self.flush_timeout < self._lease_valid_until:
            return
        started = self.clock.monotonic()
        buckets = self.store.heartbeat(self.relay_id, self.name, self.lease_seconds)
        if buckets != self.buckets:
            log.info("relay %s owns %d buckets", self.name, len(buckets))
        self.buckets = buckets
        # Count the lease from before the call: the database may have started it earlier.
        self._lease_valid_until = started + self.lease_seconds
        self._next_heartbeat = started + self.heartbeat_interval

    # -- one iteration

    def run_once(self) -> int:
        """Deliver one batch; return how many rows it held (0: nothing to do)."""
        self._heartbeat_if_due()
        batch = self.store.fetch_pending(self.buckets, self.batch_size)
        self.last_progress = self.clock.monotonic()
        if not batch:
            return 0
        outcomes = self.sink.send(batch, frozenset(self._alone.intersection(m.id for m in batch)))
        delivered = [o for o in outcomes if isinstance(o, Delivered)]
        failed = [o for o in outcomes if isinstance(o, Failed)]
        confirmed = self.store.mark_confirmed(self.relay_id, delivered)
        if confirmed != len(delivered):
            # The rows were delivered, but this relay lost their buckets meanwhile: the new
            # owner will send them again (a documented duplicate), and we must not write.
            log.warning(
                "%d delivered rows were not confirmed: their bucket lease moved to another relay",
                len(delivered) - confirmed,
            )
        updates = self.retry.updates(failed, {m.id: m for m in batch})
        self.store.record_failures(self.relay_id, updates)
        self._track_isolation(outcomes)
        self._check_order(batch, outcomes)
        outage = sum(1 for f in failed if f.kind in (FailureKind.OUTAGE, FailureKind.UNKNOWN))
        self.stats["batches"] += 1
        self.stats["delivered"] += confirmed
        self.stats["failed"] += sum(1 for u in updates if u.give_up)
        self.stats["retried"] += sum(1 for u in updates if not u.give_up) + outage
        for f in failed[:5]:
            log.warning("delivery of row %d failed (%s): %s", f.id, f.kind.value, f.error)
        self._pause = self.breaker.record(len(delivered), outage)
        self.last_progress = self.clock.monotonic()
        return len(batch)

    def _track_isolation(self, outcomes: list[Outcome]) -> None:
        """Rows rejected together with others are sent alone until they have an outcome of
        their own (see relay.kafka)."""
        for outcome in outcomes:
            if isinstance(outcome, Failed) and outcome.kind is FailureKind.ISOLATE:
                self._alone.add(outcome.id)
            elif isinstance(outcome, Delivered) or outcome.kind not in NO_WRITE:
                self._alone.discard(outcome.id)
        if len(self._alone) > 100_000:  # bounded: forgetting costs a re-isolation, not a row
            self._alone.clear()

    def _check_order(self, batch, outcomes: list[Outcome]) -> None:
        """Count deliveries that overtook an earlier, undelivered message of their key. The
        sink is built so that this does not happen; if it ever does, it is loud."""
        first_undelivered: dict[bytes, int] = {}
        for message, outcome in zip(batch, outcomes):
            if message.key is None:
                continue
            if isinstance(outcome, Delivered):
                if message.key in first_undelivered:
                    self.stats["order_inversions"] += 1
                    log.error(
                        "order inversion: row %d of key %r was delivered while row %d of the "
                        "same key was not", message.id, message.key[:40],
                        first_undelivered[message.key],
                    )
            else:
                first_undelivered.setdefault(message.key, message.id)

    _pause = 0.0

    def run(self, stop: threading.Event) -> None:
        """Loop until STOP is set; then release the leases. Errors of the database or the
        producer are logged and retried with backoff: the loop itself never dies of them."""
        log.info("relay %s (%s) started", self.name, self.relay_id)
        errors = 0
        try:
            while not stop.is_set():
                try:
                    count = self.run_once()
                    errors = 0
                except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                    errors += 1
                    delay = min(30.0, 0.5 * 2 ** min(errors - 1, 6))
                    log.error("relay iteration failed (retrying in %.1fs): %s", delay, exc)
                    self._on_error()
                    if self.clock.wait(stop, delay):
                        break
                    continue
                if self._pause:
                    log.warning("Kafka unreachable: pausing %.1fs before the next batch", self._pause)
                    if self.clock.wait(stop, self._pause):
                        break
                elif count < self.batch_size:
                    self._idle(stop)
        finally:
            self._shutdown()

    def _idle(self, stop: threading.Event) -> None:
        if stop.is_set():
            return
        if self._wait_for_work is not None:
            self._wait_for_work(self.idle_poll_interval)
        else:
            self.clock.wait(stop, self.idle_poll_interval)

    def _on_error(self) -> None:
        # A lost connection is reopened by the store on its next call; until a heartbeat
        # succeeds again the relay must not trust its leases.
        self._lease_valid_until = float("-inf")
        self._next_heartbeat = float("-inf")

    def _shutdown(self) -> None:
        try:
            self.store.release(self.relay_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not release bucket leases (they expire by themselves): %s", exc)
        log.info(
            "relay %s stopped: %d delivered, %d failed",
            self.name, self.stats["delivered"], self.stats["failed"],
        )
