"""The relay loop: lease buckets -> read pending rows -> produce -> await reports -> record.

One thread drives the loop and the producer; helper threads do the batch's database work
while Kafka works on the batch. Each step hands them "write the outcomes of the batches already
sent" and "read the next batch, leaving out the rows now in flight", and sends the current
batch meanwhile. The database and Kafka wait in parallel instead of in turn. The read runs on
a second store (`reader`: its own connection, which runner.py gives it), beside the write, not
after it: the write of outcomes was the longest stage of a drain (docs/benchmarks.md). A
store that may be used from two threads at once (the in-memory one of relay.testing) can be
its own reader.

The main thread never uses a store while a helper does (the helpers only while send() runs).
No transaction is ever open while the relay waits on Kafka.

What keeps the guarantees of docs/guarantees.md with the stages overlapped:
- per-key order: the next batch was read before this batch's outcomes were written, so the rows
  of every key that failed in this batch are dropped from it; they are read again once the
  failure is written, and the SQL's head-of-key rule then holds them back. A read beside the
  write may see none, some or all of the outcomes being written: it leaves out every row of
  the batches not yet written and drops the rows of their failed keys too;
- no confirm outside an owned lease: the UPDATE checks the bucket's owner, whenever it runs;
- the lease is renewed (and rebalanced) only with every outcome written, and the batch read
  ahead is dropped at every renewal: no row of a bucket given away is sent, and nothing read
  before a lapse of the lease (when another relay may have failed a row of its key) is sent;
- a batch stopped between its acknowledgement and its write (kill -9) is sent again by the
  next owner: the documented duplicate, never a loss.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import replace
from typing import Any, NamedTuple

from .clock import Clock, SystemClock
from .metrics import RelayMetrics
from .model import (
    SEND_MARGIN,
    Delivered,
    Failed,
    FailureKind,
    FailureUpdate,
    LoopSettings,
    Outcome,
    PendingMessage,
    Sink,
    Store,
)
from .outage_log import OutageLog
from .rate_limits import Limiter, RateLimit, throttle_wait
from .retry import NO_WRITE, CircuitBreaker, RetryPolicy
from .shards import buckets_of, whole_shards

log = logging.getLogger(__name__)


#: A step slower than this (seconds) is logged at DEBUG with its stages.
SLOW_STEP = 0.05

#: Attempts at recording one batch's outcomes (once per loop iteration, with the loop's error
#: backoff: about three and a half minutes) before they are forgotten and the rows sent again.
_WRITE_ATTEMPTS = 12


class LeaseError(RuntimeError):
    """The leases could not be renewed with time left to use them."""


class _Unwritten(NamedTuple):
    """A sent batch whose outcomes are not in the database yet."""

    delivered: list[Delivered]
    updates: list[FailureUpdate]
    #: The rows that became FAILED, with their originals: copied to the dead-letter topic once
    #: the FAILED status is written.
    dead: list[tuple[FailureUpdate, PendingMessage]]
    #: Every row of the batch, and the keys of those not delivered: a read beside the write of
    #: these outcomes leaves the rows out and holds the keys back.
    ids: tuple[int, ...] = ()
    held_keys: frozenset[bytes] = frozenset()


class Relay:
    def __init__(
        self,
        store: Store,
        sink: Sink,
        *,
        name: str = "relay",
        settings: LoopSettings | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        metrics: RelayMetrics | None = None,
        wait_for_work: Callable[[float, threading.Event], None] | None = None,
        outage_log: OutageLog | None = None,
        reader: Store,
        dead_letter_sink: Sink | None = None,
        rate_limits: Sequence[RateLimit] = (),
        **overrides,
    ):
        self.store = store
        #: Reads the next batch while `store` writes outcomes.
        self.reader = reader
        self.sink = sink
        #: Where copies of FAILED rows go: the sink itself, unless it is transactional (its
        #: progress records must name only rows of the outbox's own topics).
        self.dead_letter_sink = dead_letter_sink or sink
        self.relay_id = uuid.uuid4()
        self.name = name
        self.settings = replace(settings or LoopSettings(), **overrides)
        self.retry = retry or RetryPolicy()
        self.clock = clock or SystemClock()
        self.metrics = metrics or RelayMetrics()
        self.breaker = CircuitBreaker()
        #: Shared with the sink (runner.py): one voice for everything an outage makes noisy.
        self.outage_log = outage_log or OutageLog(log)
        # Blocks up to N seconds, until new rows are announced (LISTEN) or until the stop event
        # is set; None: a plain wait on the clock.
        self._wait_for_work = wait_for_work
        self.buckets: frozenset[int] = frozenset()
        #: Exactly-once: read one shard at a time (a backlog), and which shard was read last.
        self._shard_by_shard = False
        self._last_shard = -1
        self._lease_valid_until = float("-inf")
        self._next_heartbeat = float("-inf")
        self._idle_wait = self.settings.idle_poll_min
        self._pause = 0.0
        self._alone: set[int] = set()
        self._dead_letters: list[tuple[FailureUpdate, PendingMessage]] = []
        #: Batches sent but not written yet, oldest first (written by the helper or settle()).
        self._unwritten: list[_Unwritten] = []
        self._write_errors = 0
        #: The next batch, read while the last one was sent (None: read it when needed).
        self._read_ahead: list[PendingMessage] | None = None
        #: Does the database work of a step while its batch is sent (see the docstring).
        self._helper = ThreadPoolExecutor(2, thread_name_prefix=f"{name}-db")
        #: The last step's write and read seconds, for the slow-step log (one slot per job).
        self._helper_spent = [0.0, 0.0]
        self._resets_seen = 0
        self._pending: int | None = None  # as of the last heartbeat
        #: Limits on what is sent a second, shared with the other relays (relay.rate_limits).
        self.limiter = Limiter(rate_limits, self.clock.monotonic)
        #: After a read a limit held rows back in: seconds until it has a token again.
        self.throttled_for: float | None = None
        #: Tenants registered (or tried) by this process.
        self._tenants_seen: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.last_progress = self.clock.monotonic()

    # -- leases

    @property
    def paused_for(self) -> float:
        """Seconds the loop pauses before its next batch: the circuit breaker's wait while
        Kafka is unreachable (0 when the last batch got through)."""
        return self._pause

    def heartbeat_if_due(self) -> None:
        """Renew the leases when due (each step starts with it), and get the sink ready for
        what they hold."""
        now = self.clock.monotonic()
        s = self.settings
        # Produce only while the lease outlives every message this batch could leave in flight:
        # a batch's Kafka part ends by flush_timeout + SEND_MARGIN (relay.kafka.sink).
        if (
            now < self._next_heartbeat
            and now + s.flush_timeout + SEND_MARGIN < self._lease_valid_until
        ):
            return
        self.settle()  # a rebalance may give buckets away: nothing of them left unwritten
        # What was read ahead is read again after every renewal: the lease may have lapsed
        # since (a pause, a slow database) and another relay may have sent, failed or
        # dead-lettered rows of these buckets meanwhile, even if the same buckets come back.
        self._read_ahead = None
        for _ in range(3):
            if self._renew():
                return
        raise LeaseError(
            "the bucket leases were renewed three times without room left to send a batch "
            "(the database or Kafka answers too slowly for lease_seconds)"
        )

    def _renew(self) -> bool:
        """Renew the leases and get the sink ready for them. True when the lease still
        outlives a batch afterwards: getting ready may take long (exactly-once: initialising
        producers, reading progress records), and a relay paused meanwhile must not send
        with what it got ready. Its producers' initialisation may even have fenced a relay
        that took the shard over since: if the lease ran out, the next renewal counts it as
        lapsed and gets everything ready again, for the shards it still owns."""
        s = self.settings
        started = self.clock.monotonic()
        lapsed = started >= self._lease_valid_until
        buckets = self.store.heartbeat(self.relay_id, self.name, s.lease_seconds)
        if buckets != self.buckets:
            log.info("relay %s owns %d buckets", self.name, len(buckets))
        self.buckets = buckets
        # Count the lease from before the call: the database may have started it earlier.
        self._lease_valid_until = started + s.lease_seconds
        self._next_heartbeat = started + s.heartbeat_interval
        # Before anything of these buckets is read: rows Kafka holds that the database does
        # not know of yet (exactly-once: a crash between a transaction's commit and its write).
        recovered = self.sink.adopt(buckets, lapsed)
        if recovered:
            n = self.store.confirm_from_kafka(self.relay_id, recovered)
            self.metrics.recovered.inc(n)
            log.info(
                "confirmed %d rows found in Kafka's progress records (of %d named there)",
                n,
                len(recovered),
            )
        backlog = self.store.pending_stats(buckets)
        self._pending = backlog.total().pending
        if self.limiter:
            # These limits are still in use (a limit no relay has is forgotten after a minute).
            # Bookkeeping: a failure (a lock held past the statement timeout) must not stop
            # the renewal, and with it delivery; a limit missing meanwhile gives no tokens.
            try:
                self.store.keep_rate_limits(self.limiter.limits)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not say the rate limits are in use: %s", exc)
        self.metrics.observe_renewal(len(buckets), backlog)
        now = self.clock.monotonic()
        if now >= self._lease_valid_until:
            self._lease_valid_until = float("-inf")  # lapsed: trust nothing got ready
        if now + s.flush_timeout + SEND_MARGIN < self._lease_valid_until:
            return True
        log.warning(
            "relay %s: renewing its leases took %.1fs, too long to send a batch on them; "
            "renewing again",
            self.name,
            now - started,
        )
        return False

    # -- one step

    def run_once(self) -> int:
        """Deliver one batch and write its outcomes; return how many rows it held (0: nothing
        to do). The loop uses step(), which leaves the writing to the next step."""
        count = self.step()
        self.settle()
        return count

    def step(self) -> int:
        """Deliver one batch; return how many rows it held (0: nothing to do). While Kafka
        works on it, one helper writes the outcomes of the batches before and another reads the
        next one. This batch's outcomes are written by the next step, or by settle()."""
        begun = self.clock.monotonic()
        # Dead letters first: nothing but the read may sit between the lease check and the
        # batch's send, which the check sized the lease for. (Retention runs beside the loop:
        # relay.retention.)
        self._send_dead_letters()
        if self._read_ahead is None:
            self.settle()  # the read must see every outcome: head-of-key blocking is in SQL
        self.heartbeat_if_due()
        batch, self._read_ahead = self._read_ahead, None
        if batch is None:
            batch = self._note_read(self._fetch(self.store, self._to_read()))
        self.last_progress = self.clock.monotonic()
        if not batch:
            return 0
        started = self.clock.monotonic()
        alone = frozenset(self._alone.intersection(m.id for m in batch))
        in_flight = [m.id for m in batch]
        # The outcomes about to be written may not be visible to the read: their rows are left
        # out, and their failed keys held back below.
        held = frozenset().union(*(u.held_keys for u in self._unwritten))
        leave_out = in_flight + [i for u in self._unwritten for i in u.ids]
        unconfirmed = self._unconfirmed()
        jobs: list[Future[Any]] = [
            self._helper.submit(self._write),
            self._helper.submit(self._read, self._to_read(), leave_out),
        ]
        try:
            outcomes = self.sink.send(batch, alone, unconfirmed)
        finally:
            # However send() ended, the helpers are done with the stores before this returns.
            sent = self.clock.monotonic()
            wait_for_futures(jobs)
        self._log_if_slow(len(batch), begun, started, sent)
        self._account(batch, outcomes, started)
        # A database error surfaces here, with the outcomes kept (written by a later settle()).
        read_ahead = self._note_read([job.result() for job in jobs][-1])
        failed_keys = held | {
            m.key
            for m, o in zip(batch, outcomes, strict=False)
            if m.key is not None and not isinstance(o, Delivered)
        }
        if failed_keys:
            # Read before these failures were written (or beside): SQL could not hold them back.
            read_ahead = [m for m in read_ahead if m.key not in failed_keys]
        # After a failed batch that pauses the relay, read afresh once the pause is over.
        self._read_ahead = (read_ahead or None) if not self._pause else None
        if self._read_ahead is None:
            # Nothing to send next that the write could overlap with: write now, not after
            # the idle wait (the row's status, the lag gauges and a restart depend on it).
            self.settle()
        self.last_progress = self.clock.monotonic()
        return len(batch)

    def _log_if_slow(self, rows: int, begun: float, started: float, sent: float) -> None:
        """A step over SLOW_STEP, stage by stage, at DEBUG: what to line up against a latency
        spike (bench/stalls.py does)."""
        now = self.clock.monotonic()
        if now - begun > SLOW_STEP and log.isEnabledFor(logging.DEBUG):
            write, read = self._helper_spent
            log.debug(
                "slow step: %d rows in %.0f ms: before the send %.0f ms, send %.0f ms, "
                "then waited on the database %.0f ms (it wrote for %.0f ms and read for "
                "%.0f ms)",
                rows,
                (now - begun) * 1000,
                (started - begun) * 1000,
                (sent - started) * 1000,
                (now - sent) * 1000,
                write * 1000,
                read * 1000,
            )

    def _unconfirmed(self) -> list[int]:
        """The delivered rows whose CONFIRMED status is not written yet (or being written)."""
        return [d.id for u in self._unwritten for d in u.delivered]

    def _write(self) -> None:
        """A helper's job beside _read: the outcomes of the batches sent before."""
        begun = self.clock.monotonic()
        try:
            self.settle()
        finally:
            self._helper_spent[0] = self.clock.monotonic() - begun

    def _to_read(self) -> frozenset[int]:
        """The buckets the next read covers: all of them, or while a backlog lasts in
        exactly-once mode, the next owned shard in turn (LoopSettings.shards says why)."""
        shards = self.settings.shards
        if not (shards and self._shard_by_shard):
            return self.buckets
        owned = sorted(whole_shards(self.buckets, shards))
        if not owned:
            return self.buckets
        self._last_shard = next((s for s in owned if s > self._last_shard), owned[0])
        return frozenset(buckets_of(self._last_shard, shards))

    def _note_read(self, batch: list[PendingMessage]) -> list[PendingMessage]:
        """Shard by shard after a full batch; all shards again once a shard's read comes back
        less than half full (the backlog is gone, or that shard had little)."""
        if self.settings.shards:
            size = self.settings.batch_size
            self._shard_by_shard = len(batch) >= (size // 2 if self._shard_by_shard else size)
        return batch

    def _read(self, buckets: frozenset[int], leave_out: list[int]) -> list[PendingMessage]:
        """A helper's job beside _write, on the reader: the next batch."""
        begun = self.clock.monotonic()
        try:
            return self._fetch(self.reader, buckets, leave_out)
        finally:
            self._helper_spent[1] = self.clock.monotonic() - begun

    def _fetch(
        self, store: Store, buckets: frozenset[int], leave_out: Sequence[int] = ()
    ) -> list[PendingMessage]:
        """The next batch of BUCKETS from STORE; with rate limits, only what their tokens cover
        (relay.rate_limits: the read capped by the last look at the buckets, the tokens its
        rows want taken, the batch cut to what was given)."""
        size = self.settings.batch_size
        limiter = self.limiter
        if not limiter:
            batch = store.fetch_pending(buckets, size, leave_out)
            self._register_tenants(store, batch)
            return batch
        fetched = store.fetch_pending(buckets, size, leave_out, limiter.caps())
        self._register_tenants(store, fetched)
        wants = limiter.wants(fetched)
        left_out = limiter.left_out(fetched.left_out)
        taken = (
            store.take_tokens(limiter.limits, wants, left_out)
            if any(wants) or any(left_out)
            else None
        )
        verdict = limiter.judge(fetched, taken, left_out)
        if any(verdict.unused):
            try:
                store.return_tokens(limiter.limits, verdict.unused)
            except Exception as exc:  # noqa: BLE001 - tokens lost: less sent, never more
                log.warning("could not give unused rate-limit tokens back: %s", exc)
        self.throttled_for = verdict.wait
        self.metrics.observe_throttling(limiter.limits, verdict.held)
        return verdict.admitted

    def _register_tenants(self, store: Store, batch: Sequence[PendingMessage]) -> None:
        """Register the tenants of BATCH not seen before (local_message_tenant, against which a
        rate limit's tenant is checked at start). Once per tenant and process; a failure (a
        role without the grant) is logged once and costs nothing else: delivery goes on."""
        new = {m.tenant for m in batch if m.tenant} - self._tenants_seen
        if not new:
            return
        self._tenants_seen |= new
        try:
            store.register_tenants(sorted(new))
        except Exception as exc:  # noqa: BLE001 - bookkeeping, never in delivery's way
            log.warning("could not register tenants %s: %s", ", ".join(sorted(new)), exc)

    def settle(self) -> None:
        """Write every outcome not yet written, oldest first (the loop calls it before each
        lease renewal, before a read it does itself, and on shutdown). Each batch is removed
        once written: after an error the rest is written next time."""
        while self._unwritten:
            batch = self._unwritten[0]
            try:
                if batch.delivered:
                    self._confirm(batch.delivered)
                    # Written: a retry after an error below must not confirm them again.
                    self._unwritten[0] = batch = batch._replace(delivered=[])
                self.store.record_failures(self.relay_id, batch.updates)
            except Exception:
                self._write_errors += 1
                if self._write_errors >= _WRITE_ATTEMPTS:
                    # A write that keeps failing must not stop the relay for good (every lease
                    # renewal writes first). Forgetting it loses nothing: its rows are still
                    # PENDING and are sent again, in row order (duplicates for consumers).
                    self._unwritten.pop(0)
                    self._write_errors = 0
                    log.error(
                        "gave up recording the outcomes of %d rows after %d attempts: "
                        "they stay PENDING and will be sent again",
                        len(batch.delivered) + len(batch.updates),
                        _WRITE_ATTEMPTS,
                    )
                raise
            self._write_errors = 0
            self._unwritten.pop(0)
            # Copied at the start of the next step, after the FAILED status is written and
            # before the lease check: a batch's Kafka part stays one send().
            self._dead_letters.extend(batch.dead)

    def _confirm(self, delivered: list[Delivered]) -> None:
        confirmed = self.store.mark_confirmed(self.relay_id, delivered)
        if confirmed != len(delivered):
            # The rows were delivered, but this relay lost their buckets meanwhile: the new
            # owner will send them again (a documented duplicate), and we must not write.
            self.metrics.lease_lost.inc(len(delivered) - confirmed)
            log.warning(
                "%d delivered rows were not confirmed: their bucket lease moved to another relay",
                len(delivered) - confirmed,
            )

    def _account(
        self, batch: Sequence[PendingMessage], outcomes: Sequence[Outcome], started: float
    ) -> None:
        """Everything a batch's outcomes decide that is not a database write."""
        acked_at = dt.datetime.now(dt.timezone.utc)
        delivered = [o for o in outcomes if isinstance(o, Delivered)]
        failed = [o for o in outcomes if isinstance(o, Failed)]
        updates: list[FailureUpdate] = []
        dead: list[tuple[FailureUpdate, PendingMessage]] = []
        if failed:
            by_id = {m.id: m for m in batch}
            updates = self.retry.updates(failed, by_id)
            if self.settings.dead_letter_topic:
                dead = [(u, by_id[u.id]) for u in updates if u.give_up]
        held = frozenset(
            m.key
            for m, o in zip(batch, outcomes, strict=False)
            if m.key is not None and not isinstance(o, Delivered)
        )
        self._unwritten.append(
            _Unwritten(delivered, updates, dead, tuple(m.id for m in batch), held)
        )
        self._track_isolation(outcomes, bool(failed))
        if failed:  # with every message delivered there is nothing to overtake
            self._check_order(batch, outcomes)
        self._observe(batch, outcomes, updates, acked_at, started)
        outage = sum(1 for f in failed if f.kind in (FailureKind.OUTAGE, FailureKind.UNKNOWN))
        self._log_failures(failed, updates, batch)
        if delivered:
            self.metrics.kafka_up.set(1)
            self.outage_log.recovered()
        elif outage:
            self.metrics.kafka_up.set(0)
        self._pause = self.breaker.record(len(delivered), outage)

    def _log_failures(
        self,
        failed: Sequence[Failed],
        updates: Sequence[FailureUpdate],
        batch: Sequence[PendingMessage],
    ) -> None:
        """The first few failures of a batch; those of an outage go through the outage log
        (once each, then a summary now and then). A row is called FAILED only when it is
        marked so; before that the line says which attempt it was and when the next is."""
        written = {u.id: u for u in updates}
        tried = {m.id: m.attempts + 1 for m in batch}
        for f in failed[:5]:
            update = written.get(f.id)
            if f.kind in (FailureKind.OUTAGE, FailureKind.UNKNOWN):
                text = f"delivery of row {f.id} failed ({f.kind.value}): {f.error}"
                self.outage_log.problem(f"{f.kind.value}: {f.error}", logging.WARNING, text)
            elif update is None:  # deferred behind its key, or to be sent alone: not counted
                log.warning("delivery of row %d postponed (%s): %s", f.id, f.kind.value, f.error)
            elif update.give_up:
                log.error(
                    "row %d is FAILED after %d attempts (%s): %s (outbox show %d)",
                    f.id,
                    tried[f.id],
                    f.kind.value,
                    f.error,
                    f.id,
                )
            else:
                log.warning(
                    "delivery of row %d failed (attempt %d of %d, next in %.1fs): %s",
                    f.id,
                    tried[f.id],
                    self.retry.attempts_allowed(f.kind),
                    update.delay_seconds,
                    f.error,
                )
        if self.outage_log.in_outage:
            self.outage_log.summary_if_due(waiting=self._pending)

    def _observe(
        self,
        batch: Sequence[PendingMessage],
        outcomes: Sequence[Outcome],
        updates: Sequence[FailureUpdate],
        acked_at: dt.datetime,
        started: float,
    ) -> None:
        tally = self.metrics.observe_batch(
            batch, outcomes, updates, acked_at, self.clock.monotonic() - started
        )
        self.stats.update(tally._asdict())
        resets = self.sink.resets
        if resets > self._resets_seen:
            self.metrics.producer_resets.inc(resets - self._resets_seen)
            self._resets_seen = resets
            # A replaced producer (exactly-once: a shard's) is got ready at the next renewal.
            self._next_heartbeat = float("-inf")

    def _track_isolation(self, outcomes: Sequence[Outcome], any_failed: bool) -> None:
        """Rows rejected together with others are sent alone until they have an outcome of
        their own (see relay.kafka.sink)."""
        if not any_failed and not self._alone:
            return
        for outcome in outcomes:
            if isinstance(outcome, Failed) and outcome.kind is FailureKind.ISOLATE:
                self._alone.add(outcome.id)
            elif isinstance(outcome, Delivered) or outcome.kind not in NO_WRITE:
                self._alone.discard(outcome.id)
        if len(self._alone) > 100_000:  # bounded: forgetting costs a re-isolation, not a row
            self._alone.clear()

    def _check_order(self, batch: Sequence[PendingMessage], outcomes: Sequence[Outcome]) -> None:
        """Count deliveries that overtook an earlier, undelivered message of their key. The
        sink is built so that this does not happen; if it ever does, it is loud."""
        first_undelivered: dict[bytes, int] = {}
        for message, outcome in zip(batch, outcomes, strict=False):
            if message.key is None:
                continue
            if isinstance(outcome, Delivered):
                if message.key in first_undelivered:
                    self.stats["order_inversions"] += 1
                    self.metrics.order_inversions.inc()
                    log.error(
                        "order inversion: row %d of key %r was delivered while row %d of the "
                        "same key was not",
                        message.id,
                        message.key[:40],
                        first_undelivered[message.key],
                    )
            else:
                first_undelivered.setdefault(message.key, message.id)

    def _send_dead_letters(self) -> None:
        """Copy rows that became FAILED to the dead-letter topic. The row stays FAILED (it
        blocks its key until an operator acts) whether or not the copy arrives."""
        if not self._dead_letters:
            return
        pending, self._dead_letters = self._dead_letters, []
        topic = self.settings.dead_letter_topic
        copies = []
        for update, original in pending:
            headers = [
                *original.headers,
                ("outbox_original_topic", original.topic.encode()),
                ("outbox_error", update.error.encode("utf-8", "replace")[:1000]),
                ("outbox_row_id", str(original.id).encode()),
            ]
            copies.append(original._replace(topic=topic, headers=headers))
        outcomes = self.dead_letter_sink.send(copies)
        for (_, original), outcome in zip(pending, outcomes, strict=False):
            if isinstance(outcome, Delivered):
                self.metrics.dead_lettered.labels(original.topic).inc()
            else:
                log.error(
                    "row %d could not be copied to dead-letter topic %s: %s",
                    original.id,
                    topic,
                    outcome.error,
                )

    # -- the loop

    def run(self, stop: threading.Event) -> None:
        """Loop until STOP is set; then release the leases. Errors of the database or the
        producer are logged and retried with backoff: the loop itself never dies of them."""
        log.info("relay %s (%s) started", self.name, self.relay_id)
        errors = 0
        try:
            while not stop.is_set():
                try:
                    count = self.step()
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
                    self.outage_log.problem(
                        "pause",
                        logging.WARNING,
                        f"Kafka unreachable: pausing {self._pause:.1f}s before the next batch "
                        "(and up to 30s while it lasts)",
                    )
                    if self.clock.wait(stop, self._pause):
                        break
                elif count == 0:
                    self._idle(stop, nothing_sent=True)
                    self._idle_wait = min(self._idle_wait * 2, self.settings.idle_poll_interval)
                else:
                    self._idle_wait = self.settings.idle_poll_min
                    if count < self.settings.batch_size:
                        # A partial batch: more rows are likely on their way; a short wait
                        # lets them gather instead of spinning on one row at a time.
                        self._idle(stop)
        finally:
            self.shutdown()

    def _idle(self, stop: threading.Event, nothing_sent: bool = False) -> None:
        if stop.is_set():
            return
        wait = self._idle_wait
        if nothing_sent and self.throttled_for is not None:
            # Rows wait for a rate limit's next token: back then, not after a longer idle
            # wait, nor before it (relay.rate_limits.throttle_wait).
            wait = throttle_wait(min(wait, self.throttled_for))
        if self._wait_for_work is not None:
            self._wait_for_work(wait, stop)
        else:
            self.clock.wait(stop, wait)

    def _on_error(self) -> None:
        # A lost connection is reopened by the store on its next call; until a heartbeat
        # succeeds again the relay must not trust its leases (nor what it read ahead).
        self._lease_valid_until = float("-inf")
        self._next_heartbeat = float("-inf")
        self._read_ahead = None

    def close_stores(self) -> None:
        """Close the store and the reader: the loop's two connections."""
        try:
            self.store.close()
        finally:
            if self.reader is not self.store:
                self.reader.close()

    def shutdown(self) -> None:
        """Write the last outcomes, copy the last dead letters, release the bucket leases, so
        that other relays take over at once. What was read ahead is left PENDING."""
        self._read_ahead = None
        try:
            self.settle()
        except Exception as exc:  # noqa: BLE001
            log.error(
                "could not record the last batch's outcomes (its delivered rows will be "
                "sent again): %s",
                exc,
            )
        self._helper.shutdown(wait=False)
        try:
            self._send_dead_letters()
        except Exception as exc:  # noqa: BLE001
            log.error("could not copy rows to the dead-letter topic: %s", exc)
        try:
            self.store.release(self.relay_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not release bucket leases (they expire by themselves): %s", exc)
        log.info(
            "relay %s stopped: %d delivered, %d failed",
            self.name,
            self.stats["delivered"],
            self.stats["failed"],
        )
