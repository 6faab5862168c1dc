"""The relay's Prometheus metrics (prometheus-client), one registry per relay.

Labels are topics and failure kinds only: never a key, a DSN or anything secret.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter as Tally
from collections.abc import Sequence
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .model import Backlog, Delivered, FailureUpdate, Outcome, PendingMessage
from .rate_limits import NO_TENANT, RateLimit

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


#: Commit-to-ack latencies observed per batch: a sample, evenly spread, so that a batch of
#: 2,000 costs 64 histogram observations, not 2,000.
_LATENCY_SAMPLES = 64


class BatchTally(NamedTuple):
    """What one batch adds to the relay's running totals (Relay.stats)."""

    batches: int
    delivered: int
    #: Rows marked FAILED.
    failed: int
    #: Failures that leave the row to be sent again.
    retried: int


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.published = Counter(
            "outbox_messages_published",
            "Messages acknowledged by Kafka and confirmed.",
            ["topic"],
            registry=r,
        )
        self.failures = Counter(
            "outbox_delivery_failures",
            "Failed delivery attempts, by kind "
            "(outage, unknown, transient, permanent, deferred, isolate).",
            ["topic", "kind"],
            registry=r,
        )
        self.failed = Counter(
            "outbox_messages_failed", "Rows moved to FAILED.", ["topic"], registry=r
        )
        self.dead_lettered = Counter(
            "outbox_messages_dead_lettered",
            "FAILED rows copied to the dead-letter topic.",
            ["topic"],
            registry=r,
        )
        self.producer_resets = Counter(
            "outbox_producer_resets",
            "Producers replaced: after a fatal error, or a batch deadline that took "
            "unreported messages back.",
            registry=r,
        )
        self.order_inversions = Counter(
            "outbox_order_inversions",
            "Deliveries that overtook an undelivered earlier "
            "message of their key (expected to stay 0).",
            registry=r,
        )
        self.lease_lost = Counter(
            "outbox_confirms_refused",
            "Delivered rows not confirmed because their bucket lease had moved to another relay.",
            registry=r,
        )
        self.recovered = Counter(
            "outbox_recovered_from_kafka",
            "Rows confirmed because Kafka's progress records showed them delivered "
            "(exactly-once: a relay stopped between a transaction's commit and its write).",
            registry=r,
        )
        self.kafka_up = Gauge(
            "outbox_kafka_up",
            "1 while batches get through to Kafka, 0 since a batch got nothing through for an "
            "outage (broker unreachable, timed out).",
            registry=r,
        )
        self.kafka_up.set(1)
        self.pending = Gauge(
            "outbox_pending_messages", "PENDING rows in this relay's buckets.", registry=r
        )
        self.held = Gauge(
            "outbox_held_messages",
            "PENDING rows of this relay's buckets held behind an earlier FAILED or "
            "backing-off row of their key (head-of-key blocking): waiting on purpose.",
            registry=r,
        )
        self.oldest_claimable_age = Gauge(
            "outbox_oldest_claimable_age_seconds",
            "Age of the oldest PENDING row of this relay's buckets that may be sent now (rows "
            "in backoff and rows held behind a blocked key not counted): the lag to alert on.",
            registry=r,
        )
        self.scheduled = Gauge(
            "outbox_scheduled_messages",
            "SCHEDULED rows (all buckets): written with a due time still ahead, not yet "
            "promoted to PENDING. Refreshed by the promoter every minute, counted up to 1,000,000.",
            registry=r,
        )
        # One series per tenant with rows waiting in this relay's buckets; a tenant's series
        # is removed when it has none, so the label set stays as large as the live tenants.
        self.tenant_pending = Gauge(
            "outbox_tenant_pending_messages",
            "PENDING rows of a tenant in this relay's buckets (rows with a tenant only).",
            ["tenant"],
            registry=r,
        )
        self.tenant_held = Gauge(
            "outbox_tenant_held_messages",
            "Of those, rows held behind a blocked key of the tenant.",
            ["tenant"],
            registry=r,
        )
        self.tenant_lag = Gauge(
            "outbox_tenant_lag_seconds",
            "Age of the tenant's oldest PENDING row in this relay's buckets that may be sent "
            "now: the tenant's lag.",
            ["tenant"],
            registry=r,
        )
        self._tenants: set[str] = set()
        # One series per rate limit of the relay's configuration (a handful, set by operators).
        self.throttled = Gauge(
            "outbox_throttled",
            "1 while a rate limit holds rows back (its tokens ran out with rows waiting), 0 "
            "when its last read sent all it could; scope is tenant or topic, name '-' for the "
            "rows without a tenant.",
            ["scope", "name"],
            registry=r,
        )
        self.throttled_reads = Counter(
            "outbox_throttled_reads_total",
            "Reads in which a rate limit held rows back.",
            ["scope", "name"],
            registry=r,
        )
        self.buckets_owned = Gauge(
            "outbox_buckets_owned", "Buckets this relay holds a lease on (of 256).", registry=r
        )
        self.batch_size = Histogram(
            "outbox_batch_size",
            "Rows per batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=r,
        )
        self.batch_duration = Histogram(
            "outbox_batch_duration_seconds",
            "Fetch, produce, acknowledgements and record of one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_to_ack = Histogram(
            "outbox_commit_to_ack_seconds",
            "From the row's created_at to Kafka's acknowledgement.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    # -- what the loop reports; the bookkeeping is here, not in the loop

    def observe_renewal(self, buckets_owned: int, backlog: Backlog) -> None:
        """After a lease renewal: the gauges of what the relay's buckets hold."""
        stats = backlog.total()
        self.buckets_owned.set(buckets_owned)
        self.pending.set(stats.pending)
        self.held.set(stats.held)
        self.oldest_claimable_age.set(stats.lag_seconds or 0.0)
        tenants = {name: s for name, s in backlog.by_tenant().items() if name}
        for gone in self._tenants - tenants.keys():
            for gauge in (self.tenant_pending, self.tenant_held, self.tenant_lag):
                gauge.remove(gone)
        for name, s in tenants.items():
            self.tenant_pending.labels(name).set(s.pending)
            self.tenant_held.labels(name).set(s.held)
            self.tenant_lag.labels(name).set(s.lag_seconds or 0.0)
        self._tenants = set(tenants)

    def observe_throttling(self, limits: Sequence[RateLimit], held: Sequence[bool]) -> None:
        """After a read under rate limits: which of them held rows back."""
        for limit, holds in zip(limits, held, strict=True):
            labels = (limit.scope, limit.name or NO_TENANT)
            self.throttled.labels(*labels).set(1 if holds else 0)
            if holds:
                self.throttled_reads.labels(*labels).inc()

    def observe_batch(
        self,
        batch: Sequence[PendingMessage],
        outcomes: Sequence[Outcome],
        updates: Sequence[FailureUpdate],
        acked_at: dt.datetime,
        seconds: float,
    ) -> BatchTally:
        """A batch's outcomes, counted by topic and kind; its latencies sampled."""
        published: Tally = Tally()
        failures: Tally = Tally()
        for message, outcome in zip(batch, outcomes, strict=False):
            if isinstance(outcome, Delivered):
                published[message.topic] += 1
            else:
                failures[(message.topic, outcome.kind.value)] += 1
        for topic, n in published.items():
            self.published.labels(topic).inc(n)
        for (topic, kind), n in failures.items():
            self.failures.labels(topic, kind).inc(n)
        step = max(1, len(batch) // _LATENCY_SAMPLES)
        for message, outcome in list(zip(batch, outcomes, strict=False))[::step]:
            if isinstance(outcome, Delivered):
                latency = (acked_at - message.created_at).total_seconds()
                self.commit_to_ack.observe(max(0.0, latency))
        self.batch_size.observe(len(batch))
        self.batch_duration.observe(seconds)
        given_up = sum(1 for u in updates if u.give_up)
        return BatchTally(1, sum(published.values()), given_up, sum(failures.values()) - given_up)
