"""In-memory stand-ins for the relay's seams, shipped for unit tests (ours and yours).

InMemoryStore keeps the same rules as the PostgreSQL store: bucket leases with fair shares,
head-of-key blocking, and terminal updates only by the bucket's current owner. RecordingSink
records what was sent and answers with scripted outcomes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from outbox.message import uuid7

from .model import (
    BUCKETS,
    Backlog,
    Delivered,
    Failed,
    FailureUpdate,
    Fetched,
    Outcome,
    PendingMessage,
    PendingStats,
    group_share,
    send_in_key_order,
)
from .rate_limits import NO_CAPS, GroupCaps, RateLimit, Taken, refilled
from .shards import buckets_of, message_tag, plan_lease


def bucket_of(key: bytes | None, row_id: int) -> int:
    """The same bucket as the schema's generated column."""
    if key is None:
        return row_id % BUCKETS
    return hashlib.md5(key).digest()[0]


def _backing_off(row: Row, now: float) -> bool:
    return row.status == "PENDING" and row.next_attempt_at is not None and row.next_attempt_at > now


def _held(row: Row, blockers: dict[tuple[str, bytes], int]) -> bool:
    return row.key is not None and blockers.get((row.tenant, row.key), row.id) < row.id


@dataclass
class Row:
    id: int
    topic: str
    key: bytes | None
    payload: bytes
    headers: list = field(default_factory=list)
    message_id: uuid.UUID = field(default_factory=uuid7)
    status: str = "PENDING"
    attempts: int = 0
    next_attempt_at: float | None = None
    last_error: str | None = None
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    kafka_partition: int | None = None
    kafka_offset: int | None = None
    tenant: str = ""
    #: When a scheduled row falls due, on the store's clock (the `now` it was made with).
    deliver_at: float | None = None

    @property
    def bucket(self) -> int:
        return bucket_of(self.key, self.id)


@dataclass
class TokenBucket:
    """A row of local_message_rate."""

    limit: RateLimit
    tokens: float
    refilled_at: float
    held_at: float | None = None
    seen_at: float = 0.0


class InMemoryStore:
    def __init__(self, now: Callable[[], float], shards: int = BUCKETS):
        self._now = now
        self._shards = shards
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.rows: dict[int, Row] = {}
        self.relays: dict[uuid.UUID, float] = {}  # relay_id -> lease_until
        self.owners: dict[int, tuple[uuid.UUID, float]] = {}  # bucket -> (owner, lease_until)
        self.tenants: set[str] = set()  # local_message_tenant: registered by relays
        self.rate_buckets: dict[tuple[str, str], TokenBucket] = {}  # local_message_rate
        #: How many times promote_due woke the relays (the PostgreSQL store's NOTIFY).
        self.wakeups = 0

    def insert(
        self,
        topic: str,
        key: bytes | None,
        payload: bytes,
        headers=(),
        tenant: str = "",
        deliver_at: float | None = None,
    ) -> Row:
        """A row, as publish() writes it: SCHEDULED when DELIVER_AT (on the store's clock)
        is later than now, else PENDING."""
        with self._lock:
            row = Row(next(self._ids), topic, key, payload, list(headers), tenant=tenant)
            row.deliver_at = deliver_at
            if deliver_at is not None and deliver_at > self._now():
                row.status = "SCHEDULED"
            self.rows[row.id] = row
            return row

    def heartbeat(self, relay_id: uuid.UUID, name: str, lease_seconds: float) -> frozenset[int]:
        with self._lock:
            now = self._now()
            self.relays[relay_id] = now + lease_seconds
            alive = sorted(r for r, until in self.relays.items() if until > now)
            owned = {b for b, (o, _) in self.owners.items() if o == relay_id}
            for b in owned:
                self.owners[b] = (relay_id, now + lease_seconds)
            release, wanted = plan_lease(owned, len(alive), alive.index(relay_id), self._shards)
            for b in release:
                del self.owners[b]
            owned.difference_update(release)
            for shard in range(self._shards):
                if not wanted:
                    break
                buckets = buckets_of(shard, self._shards)
                if all(b not in self.owners or self.owners[b][1] < now for b in buckets):
                    for b in buckets:
                        self.owners[b] = (relay_id, now + lease_seconds)
                    owned.update(buckets)
                    wanted -= 1
            return frozenset(owned)

    def release(self, relay_id: uuid.UUID) -> None:
        with self._lock:
            for b in [b for b, (o, _) in self.owners.items() if o == relay_id]:
                del self.owners[b]
            self.relays.pop(relay_id, None)

    def fetch_pending(
        self,
        buckets: frozenset[int],
        limit: int,
        exclude: Sequence[int] = (),
        caps: GroupCaps | None = None,
    ) -> Fetched:
        """queries.sql's fetch_pending: (tenant, topic) groups take turns, each group's
        deliverable rows in id order, at most group_share() of each looked at, and a top-up
        from the groups that filled their share when that falls short; no group past its
        cap, the groups capped at 0 left out and named."""
        excluded = set(exclude)
        caps = caps or NO_CAPS
        tenant_caps = dict(zip(caps.tenants, caps.tenant_caps, strict=True))
        topic_caps = dict(zip(caps.topics, caps.topic_caps, strict=True))
        with self._lock:
            now = self._now()
            blockers = self._blocking_keys(buckets, now)
            groups: dict[tuple[str, str], list[Row]] = {}
            for row in sorted(self.rows.values(), key=lambda r: r.id):
                if row.status == "PENDING":
                    groups.setdefault((row.tenant, row.topic), [])
                    if (
                        row.bucket in buckets
                        and row.id not in excluded
                        and not _backing_off(row, now)
                        and not _held(row, blockers)
                    ):
                        groups[(row.tenant, row.topic)].append(row)
            cap = {
                (tenant, topic): min(
                    limit, tenant_caps.get(tenant, limit), topic_caps.get(topic, limit)
                )
                for tenant, topic in groups
            }
            # Left out, and named if this relay could send some of their rows now.
            left_out = frozenset(group for group in groups if cap[group] <= 0 and groups[group])
            live = {group: rows for group, rows in groups.items() if cap[group] > 0}
            share = group_share(limit, len(live))
            turns = [
                (turn, row.id, row)
                for group, rows in live.items()
                for turn, row in enumerate(rows[: min(share, cap[group])])
            ]
            full = [
                (group, rows)
                for group, rows in live.items()
                if len(rows) >= share and cap[group] >= share
            ]
            if len(turns) < limit and full:  # the top-up: full_groups, top_up and more
                more = group_share(limit - len(turns), len(full))
                turns += [
                    (share + turn, row.id, row)
                    for group, rows in full
                    for turn, row in enumerate(rows[share : share + min(more, cap[group] - share)])
                ]
            picked = sorted(turns, key=lambda t: t[:2])[:limit]
            return Fetched(
                [
                    PendingMessage(
                        row.id,
                        row.message_id,
                        row.topic,
                        row.key,
                        row.payload,
                        list(row.headers),
                        row.attempts,
                        row.created_at,
                        row.bucket,
                        row.tenant,
                    )
                    for _, _, row in sorted(picked, key=lambda t: t[1])
                ],
                left_out,
            )

    def _blocking_keys(self, buckets: frozenset[int], now: float) -> dict[tuple[str, bytes], int]:
        """queries.sql's blocking_keys: each (tenant, key)'s first FAILED, SENT or backing-off
        row."""
        blockers: dict[tuple[str, bytes], int] = {}
        for row in sorted(self.rows.values(), key=lambda r: r.id):
            if row.bucket not in buckets or row.key is None:
                continue
            if row.status in ("FAILED", "SENT") or _backing_off(row, now):
                blockers.setdefault((row.tenant, row.key), row.id)
        return blockers

    def _owned_by(self, row: Row, relay_id: uuid.UUID) -> bool:
        owner = self.owners.get(row.bucket)
        return owner is not None and owner[0] == relay_id

    def mark_confirmed(self, relay_id: uuid.UUID, delivered: Sequence[Delivered]) -> int:
        with self._lock:
            n = 0
            for d in delivered:
                row = self.rows.get(d.id)
                if row and row.status == "PENDING" and self._owned_by(row, relay_id):
                    self._confirm(row)
                    row.kafka_partition, row.kafka_offset = d.partition, d.offset
                    n += 1
            return n

    @staticmethod
    def _confirm(row: Row) -> None:
        row.status, row.next_attempt_at, row.last_error = "CONFIRMED", None, None

    def confirm_from_kafka(self, relay_id: uuid.UUID, rows: Sequence[tuple[int, bytes]]) -> int:
        with self._lock:
            n = 0
            for row_id, tag in rows:
                row = self.rows.get(row_id)
                if (
                    row
                    and row.status == "PENDING"
                    and message_tag(row.message_id) == tag
                    and self._owned_by(row, relay_id)
                ):
                    self._confirm(row)
                    n += 1
            return n

    def record_failures(self, relay_id: uuid.UUID, failures: Sequence[FailureUpdate]) -> int:
        with self._lock:
            n = 0
            now = self._now()
            for f in failures:
                row = self.rows.get(f.id)
                if not (row and row.status == "PENDING" and self._owned_by(row, relay_id)):
                    continue
                row.attempts += f.counted
                row.last_error = f.error
                if f.give_up:
                    row.status, row.next_attempt_at = "FAILED", None
                else:
                    row.next_attempt_at = now + f.delay_seconds
                n += 1
            return n

    def pending_stats(self, buckets: frozenset[int]) -> Backlog:
        with self._lock:
            now_wall = dt.datetime.now(dt.timezone.utc)
            now = self._now()
            blockers = self._blocking_keys(buckets, now)
            groups: dict[tuple[str, str], list[Row]] = {}
            for r in self.rows.values():
                if r.status == "PENDING" and r.bucket in buckets:
                    groups.setdefault((r.tenant, r.topic), []).append(r)
            backlog = Backlog()
            for group, pending in sorted(groups.items()):
                held = [r for r in pending if _held(r, blockers)]
                due = [r for r in pending if not _backing_off(r, now) and not _held(r, blockers)]
                oldest = min((r.created_at for r in due), default=None)
                lag = (now_wall - oldest).total_seconds() if oldest else None
                backlog[group] = PendingStats(len(pending), len(held), lag)
            return backlog

    # -- rate limits: queries.sql's set_rate_limits, keep_rate_limits, known_tenants,
    # register_tenants, take_tokens

    def set_rate_limits(self, limits: Sequence[RateLimit]) -> None:
        self._put_rate_limits(limits, starting=True)

    def keep_rate_limits(self, limits: Sequence[RateLimit]) -> None:
        self._put_rate_limits(limits, starting=False)

    def _put_rate_limits(self, limits: Sequence[RateLimit], starting: bool) -> None:
        with self._lock:
            now = self._now()
            wanted = {(limit.scope, limit.name): limit for limit in limits}
            for scope_name, old in list(self.rate_buckets.items()):
                if scope_name not in wanted and old.seen_at < now - 60:
                    del self.rate_buckets[scope_name]
            for scope_name, limit in wanted.items():
                bucket = self.rate_buckets.get(scope_name)
                if bucket is None:
                    tokens = limit.burst if starting else 0.0
                    self.rate_buckets[scope_name] = TokenBucket(limit, tokens, now, seen_at=now)
                    continue
                bucket.seen_at = now
                if starting:  # in force for every relay: the table is the one source
                    bucket.limit = limit
                    bucket.tokens = min(bucket.tokens, limit.burst)

    def known_tenants(self, tenants: Sequence[str]) -> set[str]:
        with self._lock:
            waiting = {r.tenant for r in self.rows.values() if r.status == "PENDING"}
            return set(tenants) & (self.tenants | waiting)

    def register_tenants(self, tenants: Sequence[str]) -> None:
        with self._lock:
            self.tenants.update(tenants)

    def take_tokens(
        self, limits: Sequence[RateLimit], wants: Sequence[int], held: Sequence[bool]
    ) -> Taken:
        granted, available = [], []
        with self._lock:
            now = self._now()
            for limit, want, holds in zip(limits, wants, held, strict=True):
                bucket = self.rate_buckets.get((limit.scope, limit.name))
                if bucket is None:
                    granted.append(0)
                    available.append(0.0)
                    continue
                have = refilled(bucket.tokens, bucket.limit, now - bucket.refilled_at)
                took = min(want, math.floor(have))
                bucket.tokens = have - took
                bucket.refilled_at = max(bucket.refilled_at, now)
                if holds or took < want:
                    bucket.held_at = now
                granted.append(took)
                available.append(have)
        return Taken(granted, available)

    def return_tokens(self, limits: Sequence[RateLimit], unused: Sequence[int]) -> None:
        with self._lock:
            for limit, n in zip(limits, unused, strict=True):
                bucket = self.rate_buckets.get((limit.scope, limit.name))
                if bucket is not None and n > 0:
                    bucket.tokens = min(bucket.limit.burst, bucket.tokens + n)

    def delete_confirmed(self, older_than_seconds: float, limit: int) -> int:
        with self._lock:
            cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_seconds)
            old = [
                r.id
                for r in sorted(self.rows.values(), key=lambda r: r.id)
                if r.status == "CONFIRMED" and r.created_at < cutoff
            ][:limit]
            for row_id in old:
                del self.rows[row_id]
            return len(old)

    def promote_due(self, limit: int) -> int:
        """queries.sql's promote_due: the earliest due SCHEDULED rows become PENDING."""
        with self._lock:
            now = self._now()
            due = sorted(
                (
                    r
                    for r in self.rows.values()
                    if r.status == "SCHEDULED" and r.deliver_at is not None and r.deliver_at <= now
                ),
                key=lambda r: (r.deliver_at, r.id),
            )[:limit]
            for row in due:
                row.status = "PENDING"
            if due:
                self.wakeups += 1
            return len(due)

    def next_due(self) -> float | None:
        with self._lock:
            times = [
                r.deliver_at
                for r in self.rows.values()
                if r.status == "SCHEDULED" and r.deliver_at is not None
            ]
            return min(times) - self._now() if times else None

    def scheduled_count(self) -> int:
        with self._lock:
            return sum(1 for r in self.rows.values() if r.status == "SCHEDULED")

    def close(self) -> None:
        pass


class RecordingSink:
    """Records every message sent; `script(message) -> Outcome | None` decides the outcome
    (None: delivered to partition 0 at the next offset)."""

    def __init__(self, script: Callable[[PendingMessage], Outcome | None] | None = None):
        self.sent: list[PendingMessage] = []
        self.alone_requests: list[frozenset[int]] = []
        self.script = script
        self.resets = 0  # it has no producer to replace
        self._offsets = itertools.count()

    def adopt(self, buckets: frozenset[int], lease_lapsed: bool) -> list[tuple[int, bytes]]:
        return []

    def send(
        self,
        batch: Sequence[PendingMessage],
        alone: frozenset[int] = frozenset(),
        unconfirmed: Sequence[int] = (),
    ) -> list[Outcome]:
        self.alone_requests.append(alone)

        def produce_one(message: PendingMessage) -> Failed | None:
            outcome = self.script(message) if self.script else None
            if isinstance(outcome, Failed):
                return Failed(message.id, outcome.kind, outcome.error, outcome.fatal)
            self.sent.append(message)
            return None

        failed = send_in_key_order(batch, produce_one)
        return [failed.get(m.id) or Delivered(m.id, 0, next(self._offsets)) for m in batch]

    def close(self, timeout: float) -> None:
        pass


class FakeClock:
    """A clock that moves only when told to (or when the relay waits on it)."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += max(0.0, seconds)
        return stop.is_set()
