"""Values passed between the relay loop, its store and its sink. No I/O here."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias

if TYPE_CHECKING:  # relay.rate_limits imports this module
    from .rate_limits import GroupCaps, RateLimit, Taken

#: Seconds a sink's send() may take beyond the flush_timeout it was given: taking back what is
#: unreported at the deadline and replacing the producer. A batch's Kafka part takes at most
#: flush_timeout + SEND_MARGIN; leases are sized and checked against that.
SEND_MARGIN = 3.0


class PendingMessage(NamedTuple):
    """A row the relay may deliver now. (NamedTuples, not dataclasses, for the values made per
    message: a frozen dataclass costs several times more to build, at 20,000 a second.)"""

    id: int
    #: The message_id as text, as it goes into the Kafka header.
    message_id: uuid.UUID | str
    topic: str
    key: bytes | None
    payload: bytes
    headers: list[tuple[str, bytes | None]]
    attempts: int
    created_at: dt.datetime
    #: The row's bucket (schema.sql): exactly-once delivery groups rows by the shard it is in.
    bucket: int = 0
    #: '' for no tenant.
    tenant: str = ""


class Fetched(list[PendingMessage]):
    """A read's rows, in id order, and the (tenant, topic) groups with rows waiting that the
    read left out because a rate limit's tokens ran out (relay.rate_limits)."""

    def __init__(self, rows=(), left_out: frozenset[tuple[str, str]] = frozenset()):
        super().__init__(rows)
        self.left_out = left_out


class FailureKind(Enum):
    #: The cluster is unreachable or overloaded: not the message's fault, no attempt counted.
    OUTAGE = "outage"
    #: This message failed but may succeed later (counted, retried with backoff).
    TRANSIENT = "transient"
    #: This message cannot be delivered as it is (too large, no such topic, not authorised).
    PERMANENT = "permanent"
    #: Handed to the producer, outcome unknown (flush timed out, producer reset): it may be in
    #: Kafka. Retried without counting an attempt; a duplicate is possible.
    UNKNOWN = "unknown"
    #: Not sent: an earlier message of its key failed before it in the same batch. Sent again
    #: once that one is resolved (head-of-key order); nothing is written for it.
    DEFERRED = "deferred"
    #: Rejected for good in a request it shared with other messages, so which one was at fault
    #: is not known: sent alone next time, and only then counted. Nothing is written.
    ISOLATE = "isolate"


class Delivered(NamedTuple):
    id: int
    #: None for a row found in Kafka's progress records (exactly-once recovery): delivered,
    #: at a place not recorded.
    partition: int | None
    offset: int | None


class Failed(NamedTuple):
    id: int
    kind: FailureKind
    error: str
    #: The producer cannot go on (librdkafka fatal error): the relay must recreate it.
    fatal: bool = False


Outcome: TypeAlias = Delivered | Failed


class PendingStats(NamedTuple):
    """What waits in a set of buckets, for the gauges and `outbox status`."""

    #: PENDING rows.
    pending: int
    #: Of those, rows held behind an earlier FAILED row of their key, or one waiting for its
    #: retry: they wait on purpose (head-of-key blocking), and are shown as blocked keys.
    held: int
    #: Age in seconds of the oldest row that may be sent now (not held, not in backoff): the
    #: lag. None when there is none.
    lag_seconds: float | None

    @classmethod
    def total(cls, parts: Iterable[PendingStats]) -> PendingStats:
        """The stats of several topics (or bucket sets) together."""
        parts = list(parts)
        lags = [p.lag_seconds for p in parts if p.lag_seconds is not None]
        return cls(
            sum(p.pending for p in parts), sum(p.held for p in parts), max(lags, default=None)
        )


class Backlog(dict[tuple[str, str], PendingStats]):
    """What waits in a set of buckets, by (tenant, topic); tenant '' is no tenant."""

    def total(self) -> PendingStats:
        return PendingStats.total(self.values())

    def by_tenant(self) -> dict[str, PendingStats]:
        return self._by(0)

    def by_topic(self) -> dict[str, PendingStats]:
        return self._by(1)

    def _by(self, part: int) -> dict[str, PendingStats]:
        grouped: dict[str, list[PendingStats]] = {}
        for group, stats in self.items():
            grouped.setdefault(group[part], []).append(stats)
        return {name: PendingStats.total(parts) for name, parts in sorted(grouped.items())}


def group_share(limit: int, groups: int) -> int:
    """How many rows of each (tenant, topic) group the fair read looks at: the batch split
    over the groups four times over, at most the batch (queries.sql, fetch_pending)."""
    return min(limit, -(-4 * limit // max(groups, 1)))


class FailureUpdate(NamedTuple):
    """What the store records for one failed row."""

    id: int
    #: 1 when the failure counts as an attempt, 0 for outages and unknown outcomes.
    counted: int
    error: str
    #: Move the row to FAILED (permanent error, or max attempts reached).
    give_up: bool
    #: Backoff before the next attempt.
    delay_seconds: float


def send_in_key_order(batch, produce_one) -> dict[int, Failed]:
    """Hand BATCH to PRODUCE_ONE in id order, holding back every later message of a key once
    one of its messages failed synchronously (PRODUCE_ONE returned a Failed). Returns the
    failures by row id; the rest were handed to the producer. Shared by every sink, so that
    an in-batch failure can never let a later message of its key overtake it."""
    failed: dict[int, Failed] = {}
    blocked: set[bytes] = set()
    for message in batch:
        if message.key is not None and message.key in blocked:
            failed[message.id] = Failed(
                message.id, FailureKind.DEFERRED, "an earlier message of its key failed"
            )
            continue
        failure = produce_one(message)
        if failure is not None:
            failed[message.id] = failure
            if message.key is not None:
                blocked.add(message.key)
    return failed


#: How long the sink trusts an answer that a topic does not exist (or may not be written): the
#: retries of a permanent failure wait longer (relay.retry), so that each one asks the cluster
#: again instead of reading the same cached answer.
TOPIC_ERROR_TTL = 5.0

#: A row's statuses (schema.sql's check): SENT is the original design's claimed status, which
#: this relay never writes.
STATUSES = ("PENDING", "SENT", "CONFIRMED", "FAILED", "SKIPPED", "SCHEDULED")


@dataclass(frozen=True)
class LoopSettings:
    """The loop's settings; RelayConfig takes its defaults from here."""

    batch_size: int = 2000
    lease_seconds: float = 90.0
    heartbeat_interval: float = 10.0
    flush_timeout: float = 35.0
    #: Idle waits start at idle_poll_min and double up to idle_poll_interval while nothing
    #: comes; any work resets them. NOTIFY (when on) ends a wait at once.
    idle_poll_min: float = 0.002
    idle_poll_interval: float = 1.0
    #: Copy rows that become FAILED to this topic ("" = off).
    dead_letter_topic: str = ""
    #: Exactly-once: the buckets form this many shards, one Kafka transaction per shard in a
    #: batch (0: at least once). While a backlog lasts, each batch is read from one shard in
    #: turn: one transaction of a full batch, not one small transaction per shard, whose
    #: fixed costs (the coordinator's round trips, a marker written to every partition)
    #: halved the drain rate with 16 shards (docs/benchmarks.md).
    shards: int = 0


#: Every key maps to one of this many buckets; a relay leases whole buckets (docs/design.md).
BUCKETS = 256


def fair_share(alive: int, rank: int, units: int = BUCKETS) -> int:
    """How many of UNITS (buckets, or shards of buckets) a relay of RANK (0-based) among ALIVE
    relays should own."""
    alive = max(alive, 1)
    return units // alive + (1 if rank < units % alive else 0)


# -- The loop's two seams. relay.store.PostgresStore and relay.kafka.KafkaSink are the real ones,
# relay.testing has in-memory ones; tests/integration/test_store_contract.py and
# test_sink_contract.py hold each pair to the same behaviour.


class Store(Protocol):
    """What the relay loop needs from the database."""

    def heartbeat(self, relay_id: uuid.UUID, name: str, lease_seconds: float) -> frozenset[int]:
        """Say this relay is alive, renew and rebalance its bucket leases, return them."""

    def fetch_pending(
        self,
        buckets: frozenset[int],
        limit: int,
        exclude: Sequence[int] = (),
        caps: GroupCaps | None = None,
    ) -> Fetched:
        """Up to LIMIT deliverable rows of BUCKETS in id order, none of EXCLUDE; of the
        groups of a tenant or topic CAPS names, at most that many rows each, none when 0 (the
        groups left out, with rows waiting, are named in the result). A key whose oldest
        unfinished row is FAILED or waits for a retry has no row deliverable."""

    def mark_confirmed(self, relay_id: uuid.UUID, delivered: Sequence[Delivered]) -> int:
        """Mark PENDING rows of buckets RELAY_ID owns CONFIRMED; return how many changed."""

    def record_failures(self, relay_id: uuid.UUID, failures: Sequence[FailureUpdate]) -> int:
        """Record failures of PENDING rows of buckets RELAY_ID owns; return how many changed."""

    def confirm_from_kafka(self, relay_id: uuid.UUID, rows: Sequence[tuple[int, bytes]]) -> int:
        """Mark CONFIRMED the PENDING rows of buckets RELAY_ID owns that ROWS name: the id and
        the last 8 bytes of the message_id both match (relay.shards.message_tag). Return how
        many changed."""

    def release(self, relay_id: uuid.UUID) -> None:
        """Give back every bucket of RELAY_ID and forget it."""

    def pending_stats(self, buckets: frozenset[int]) -> Backlog:
        """What waits in BUCKETS, by tenant and topic: PENDING rows, those held behind a
        blocked key, the lag."""

    def delete_confirmed(self, older_than_seconds: float, limit: int) -> int:
        """Delete up to LIMIT CONFIRMED rows created over OLDER_THAN_SECONDS ago."""

    # Rate limits (relay.rate_limits): called only when the relay has limits.

    def set_rate_limits(self, limits: Sequence[RateLimit]) -> None:
        """Put LIMITS in force for every relay (a new one with a full bucket); forget the
        limits no relay has had for a minute."""

    def keep_rate_limits(self, limits: Sequence[RateLimit]) -> None:
        """Say LIMITS are still in use (a missing one comes back empty); forget the limits no
        relay has had for a minute."""

    def known_tenants(self, tenants: Sequence[str]) -> set[str]:
        """Those of TENANTS registered, or with rows waiting."""

    def register_tenants(self, tenants: Sequence[str]) -> None:
        """Register TENANTS as known (those already are stay as they are)."""

    def take_tokens(
        self, limits: Sequence[RateLimit], wants: Sequence[int], held: Sequence[bool]
    ) -> Taken:
        """Refill each limit's bucket and take up to its WANTS whole tokens; note the limits
        that hold rows back (given less than wanted, or HELD)."""

    def return_tokens(self, limits: Sequence[RateLimit], unused: Sequence[int]) -> None:
        """Give each limit's UNUSED tokens back, up to its burst."""

    def promote_due(self, limit: int) -> int:
        """Make up to LIMIT SCHEDULED rows whose due time has come PENDING, the earliest due
        first, skipping rows locked by others; wake idle relays if any was. Return how many."""

    def next_due(self) -> float | None:
        """Seconds until the earliest SCHEDULED row is due (0 or less: due now); None if none."""

    def scheduled_count(self) -> int:
        """How many rows are SCHEDULED."""

    def close(self) -> None: ...


class Sink(Protocol):
    """Where the relay sends messages."""

    #: How many times the sink replaced its producer (after a fatal error, or a batch deadline
    #: that took messages back); the loop counts it.
    resets: int

    def adopt(self, buckets: frozenset[int], lease_lapsed: bool) -> list[tuple[int, bytes]]:
        """Called after every lease renewal, before anything of BUCKETS is read: get ready to
        send their rows (LEASE_LAPSED: the lease may have lapsed since the last call, so trust
        nothing kept from before). Returns the rows Kafka already holds that the database may
        not know of, as (id, tag of the message_id): the relay marks them CONFIRMED before
        reading. Only the exactly-once sink has any (docs/guarantees.md, section 9)."""

    def send(
        self,
        batch: Sequence[PendingMessage],
        alone: frozenset[int] = frozenset(),
        unconfirmed: Sequence[int] = (),
    ) -> list[Outcome]:
        """One outcome per message, in batch order. A key's message is not sent after an
        earlier message of the key failed in the batch. Messages whose id is in ALONE are sent
        alone (relay.kafka.sink's docstring says why). UNCONFIRMED: rows delivered earlier whose
        CONFIRMED status may not be written yet; the exactly-once sink records them again
        in Kafka with this batch, so that a crash before that write sends none of them again."""

    def close(self, timeout: float) -> None: ...
