"""What `outbox status` reports, read in one short transaction."""

from __future__ import annotations

from typing import Any

import psycopg

from outbox.schema import require_schema
from outbox.sql import one_row, query

from . import operations
from .model import BUCKETS, STATUSES, Backlog, PendingStats
from .selection import key_text
from .store import int_array

#: Seconds past its due time after which a SCHEDULED row is overdue: the promoters look at
#: least every second, so a row still SCHEDULED after this has no relay promoting it.
OVERDUE_AFTER = 10.0

#: A topic or tenant whose rows are all delivered (or FAILED): nothing waits.
NOTHING_WAITING = PendingStats(0, 0, None)


def read_status(conn: psycopg.Connection, schema: str, rate_window: float = 60.0) -> dict[str, Any]:
    """The report; each topic's delivery rate is over the last RATE_WINDOW seconds."""
    require_schema(conn, schema)

    def q(name: str):
        return query("relay", "status.sql", name, schema)

    with conn.transaction():
        counts = {s: 0 for s in STATUSES}
        by_topic: dict[str, dict[str, int]] = {}
        by_tenant: dict[str, dict[str, int]] = {}
        delivered: dict[str, int] = {}
        tenant_delivered: dict[str, int] = {}
        for tenant, topic, st, n, recent in conn.execute(
            q("counts_by_topic"), {"window": rate_window}
        ):
            counts[st] = counts.get(st, 0) + n
            for name, table in ((topic, by_topic), (tenant, by_tenant)):
                table.setdefault(name, {})
                table[name][st] = table[name].get(st, 0) + n
            delivered[topic] = delivered.get(topic, 0) + recent
            tenant_delivered[tenant] = tenant_delivered.get(tenant, 0) + recent
        # The relay's gauges' own query over every bucket: they and this report agree.
        backlog = Backlog(
            ((tenant, topic), PendingStats(*rest))
            for tenant, topic, *rest in conn.execute(
                query("relay", "queries.sql", "pending_stats", schema),
                {"buckets": int_array(range(BUCKETS))},
            )
        )
        waiting = backlog.by_topic()
        waiting_tenants = backlog.by_tenant()
        total = backlog.total()
        relays = [
            {"relay_id": str(rid), "name": name, "heartbeat_at": hb, "buckets": buckets}
            for rid, name, hb, buckets in conn.execute(q("relays"))
        ]
        version = one_row(conn.execute(q("schema_version")))[0]
        (in_backoff,) = one_row(conn.execute(q("in_backoff")))
        scheduled, next_due_at, next_due_in = one_row(conn.execute(q("scheduled")))
        blocked = operations.blocked_keys(conn, schema, limit=10)
        blocked_count = operations.blocked_key_count(conn, schema)
        limits = [
            dict(
                zip(
                    ("scope", "name", "rate", "burst", "tokens", "held_at", "throttled"),
                    row,
                    strict=True,
                )
            )
            for row in conn.execute(query("relay", "queries.sql", "rate_limits_now", schema))
        ]
    return {
        "schema": schema,
        "schema_version": version,
        "counts": counts,
        "by_topic": by_topic,
        "oldest_pending_age_seconds": total.lag_seconds,
        "held": total.held,
        "rate_window_seconds": rate_window,
        "topics": {
            topic: {
                "counts": counts,
                "lag_seconds": waiting.get(topic, NOTHING_WAITING).lag_seconds,
                "held": waiting.get(topic, NOTHING_WAITING).held,
                "delivered_per_second": delivered.get(topic, 0) / rate_window,
            }
            for topic, counts in by_topic.items()
        },
        # Only when some row has a tenant: '' stands for the rows without one.
        "tenants": {
            tenant: {
                "counts": counts,
                "pending": waiting_tenants.get(tenant, NOTHING_WAITING).pending,
                "lag_seconds": waiting_tenants.get(tenant, NOTHING_WAITING).lag_seconds,
                "held": waiting_tenants.get(tenant, NOTHING_WAITING).held,
                "delivered_per_second": tenant_delivered.get(tenant, 0) / rate_window,
            }
            for tenant, counts in by_tenant.items()
        }
        if set(by_tenant) - {""}
        else {},
        "in_backoff": in_backoff,
        # Rows written with a due time still ahead: not lag, not counted as waiting.
        "scheduled": {
            "count": scheduled,
            "next_due_at": next_due_at,
            "next_due_in_seconds": next_due_in,
        },
        "blocked_key_count": blocked_count,
        "blocked_keys": [
            {
                "tenant": b["tenant"],
                "key": key_text(b["key"]),
                "first_failed": b["first_failed"],
                "failed": b["failed"],
                "held": b["held"],
            }
            for b in blocked
        ],
        "rate_limits": limits,
        "relays": relays,
    }


def health_problems(
    report: dict[str, Any], fail_if_lag: float | None, fail_if_failed: bool
) -> list[str]:
    """What makes `outbox status --fail-if-lag / --fail-if-failed` exit 1: the lag over
    FAIL_IF_LAG seconds, FAILED rows."""
    problems = []
    lag = report["oldest_pending_age_seconds"]
    if fail_if_lag is not None and lag is not None and lag > fail_if_lag:
        problems.append(f"lag {lag:.1f}s > {fail_if_lag:g}s")
    # Scheduled rows past their time are lag too, invisible to the PENDING rows' figure.
    due_in = report["scheduled"]["next_due_in_seconds"]
    if fail_if_lag is not None and due_in is not None and -due_in > max(fail_if_lag, OVERDUE_AFTER):
        problems.append(
            f"scheduled rows overdue by {-due_in:.1f}s > {fail_if_lag:g}s (no relay promoting)"
        )
    if fail_if_failed and report["counts"]["FAILED"]:
        problems.append(f"{report['counts']['FAILED']} FAILED rows")
    if fail_if_failed and report["counts"]["SENT"]:
        # Held by the original design's claim: nothing moves them but `replay --expired-claims`.
        problems.append(f"{report['counts']['SENT']} SENT rows (outbox replay --expired-claims)")
    return problems
