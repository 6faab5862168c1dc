"""Every query the relay makes, behind one class. The relay never writes SQL itself."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import psycopg
from psycopg.rows import tuple_row

from outbox.message import headers_from_json
from outbox.schema import require_schema
from outbox.sql import one_row, query

from .model import (
    BUCKETS,
    Backlog,
    Delivered,
    FailureUpdate,
    Fetched,
    PendingMessage,
    PendingStats,
)
from .rate_limits import NO_CAPS, GroupCaps, RateLimit, Taken
from .shards import plan_lease, validate_shards


def int_array(values) -> str:
    """An integer array as PostgreSQL's array literal ("{1,2,3}"), for a `%s::bigint[]`
    parameter. Per batch the relay passes thousands of ids, partitions and offsets; psycopg's
    list dumper spends ~15% of the relay's CPU on them, str.join a small fraction of that."""
    return "{" + ",".join(map(str, values)) + "}"


def confirm_params(relay_id: uuid.UUID, delivered: Sequence[Delivered]) -> dict:
    """The parameters of queries.sql's mark_confirmed: ids, and {id: [partition, offset]}
    (integers only: joined as text, without json.dumps's cost on 2,000 rows a batch). A row
    whose place is not known (recovered from Kafka's progress records) gets none."""
    places = ",".join(
        f'"{d.id}":[{d.partition},{d.offset}]' for d in delivered if d.partition is not None
    )
    return {
        "relay_id": relay_id,
        "ids": int_array([d.id for d in delivered]),
        "places": "{" + places + "}",
    }


def failure_params(relay_id: uuid.UUID, failures: Sequence[FailureUpdate]) -> dict:
    """The parameters of record_failures: ids, and {id: [counted, error, give_up, delay]}."""
    # PostgreSQL's text (and jsonb) cannot hold NUL: an error text from a broker must not make
    # the write of its outcome fail.
    outcomes = {
        str(f.id): [f.counted, f.error.replace("\x00", ""), f.give_up, f.delay_seconds]
        for f in failures
    }
    return {
        "relay_id": relay_id,
        "ids": int_array([f.id for f in failures]),
        "outcomes": json.dumps(outcomes, ensure_ascii=False, allow_nan=False),
    }


def limit_params(limits: Sequence[RateLimit]) -> dict:
    """The limits as the parallel arrays of queries.sql's rate-limit blocks (a block uses
    the ones it names)."""
    return {
        "scopes": [limit.scope for limit in limits],
        "names": [limit.name for limit in limits],
        "rates": [limit.rate for limit in limits],
        "bursts": [limit.burst for limit in limits],
    }


class PostgresStore:
    """The relay's queries on one autocommit connection: each statement is its own short
    transaction (the lease renewal, the release and the read group theirs in one), none open while
    the relay waits on Kafka."""

    def __init__(
        self,
        dsn: str,
        schema: str | None = None,
        connect_timeout: float = 10.0,
        *,
        shards: int = BUCKETS,
    ):
        self._dsn = dsn
        #: Leases are taken and given back in whole shards (relay.shards).
        self._shards = validate_shards(shards)
        self._schema = schema
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection | None = None
        self._buckets_seen: frozenset[int] | None = None
        self._buckets_literal = "{}"

    # -- connection

    def connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, int(self._connect_timeout)),
                application_name="outbox-relay",
                row_factory=tuple_row,
                # A table locked by someone else must not hang the relay: its statements give
                # up, the loop logs it and retries; and it is never idle in a transaction.
                # Custom plans: a generic plan is fixed after five runs from the statistics of
                # that moment; made while the table was small (a fresh table, a quiet hour),
                # it was kept once a backlog grew: seconds per write, then the 60 s timeout
                # (bench/stalls.py at 10,000 msgs/s). Planning costs under 1 ms per statement.
                options="-c lock_timeout=5s -c statement_timeout=60s "
                "-c idle_in_transaction_session_timeout=60s "
                "-c plan_cache_mode=force_custom_plan",
            )
            require_schema(self._conn, self._schema)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _bucket_array(self, buckets: frozenset[int]) -> str:
        # The same set on every read: its literal is made once per lease change.
        if buckets is not self._buckets_seen:
            self._buckets_seen, self._buckets_literal = buckets, int_array(sorted(buckets))
        return self._buckets_literal

    def _q(self, name: str):
        return query("relay", "queries.sql", name, self._schema)

    def _execute(self, name: str, params: dict) -> psycopg.Cursor:
        return self.connect().execute(self._q(name), params, prepare=True)

    # -- leases

    def heartbeat(self, relay_id: uuid.UUID, name: str, lease_seconds: float) -> frozenset[int]:
        conn = self.connect()
        with conn.transaction():
            alive, rank = one_row(
                conn.execute(
                    self._q("heartbeat"),
                    {"relay_id": relay_id, "name": name, "lease_seconds": lease_seconds},
                )
            )
            owned = {
                row[0]
                for row in conn.execute(
                    self._q("renew_buckets"),
                    {"relay_id": relay_id, "lease_seconds": lease_seconds},
                )
            }
            release, wanted = plan_lease(owned, alive, rank, self._shards)
            if release:
                conn.execute(self._q("release_buckets"), {"relay_id": relay_id, "buckets": release})
                owned.difference_update(release)
            if wanted:
                got = conn.execute(
                    self._q("acquire_shards"),
                    {
                        "relay_id": relay_id,
                        "lease_seconds": lease_seconds,
                        "count": wanted,
                        "width": BUCKETS // self._shards,
                    },
                )
                owned.update(row[0] for row in got)
        return frozenset(owned)

    def release(self, relay_id: uuid.UUID) -> None:
        conn = self.connect()
        with conn.transaction():
            conn.execute(
                self._q("release_buckets"),
                {"relay_id": relay_id, "buckets": list(range(BUCKETS))},
            )
            conn.execute(self._q("forget_relay"), {"relay_id": relay_id})

    # -- messages

    def fetch_pending(
        self,
        buckets: frozenset[int],
        limit: int,
        exclude: Sequence[int] = (),
        caps: GroupCaps | None = None,
    ) -> Fetched:
        if not buckets:
            return Fetched()
        caps = caps or NO_CAPS
        conn = self.connect()
        with conn.transaction():  # for read_in_id_order's SET LOCAL (queries.sql says why)
            conn.execute(self._q("read_in_id_order"), prepare=False)
            # Binary results: bytea and timestamps arrive as they are, not as text to parse.
            rows = conn.execute(
                self._q("fetch_pending"),
                {
                    "buckets": self._bucket_array(buckets),
                    "limit": limit,
                    "exclude": int_array(exclude),
                    "cap_tenants": caps.tenants,
                    "tenant_caps": caps.tenant_caps,
                    "cap_topics": caps.topics,
                    "topic_caps": caps.topic_caps,
                },
                prepare=True,
                binary=True,
            ).fetchall()
        # The groups left out, as rows without an id (queries.sql says why).
        left_out = frozenset((row[9], row[2]) for row in rows if row[0] is None)
        return Fetched(
            (
                PendingMessage(
                    row[0],
                    row[1],
                    row[2],
                    row[3],
                    row[4],
                    headers_from_json(row[5]) if row[5] else [],
                    row[6],
                    row[7],
                    row[8],
                    row[9],
                )
                for row in rows
                if row[0] is not None
            ),
            left_out,
        )

    def mark_confirmed(self, relay_id: uuid.UUID, delivered: Sequence[Delivered]) -> int:
        if not delivered:
            return 0
        return self._execute("mark_confirmed", confirm_params(relay_id, delivered)).rowcount

    def confirm_from_kafka(self, relay_id: uuid.UUID, rows: Sequence[tuple[int, bytes]]) -> int:
        if not rows:
            return 0
        params = {
            "relay_id": relay_id,
            "ids": int_array([i for i, _ in rows]),
            "tags": json.dumps({str(i): tag.hex() for i, tag in rows}),
        }
        return self._execute("confirm_from_kafka", params).rowcount

    def record_failures(self, relay_id: uuid.UUID, failures: Sequence[FailureUpdate]) -> int:
        if not failures:
            return 0
        return self._execute("record_failures", failure_params(relay_id, failures)).rowcount

    # -- rate limits (relay.rate_limits)

    def set_rate_limits(self, limits: Sequence[RateLimit]) -> None:
        self._execute("set_rate_limits", limit_params(limits))

    def keep_rate_limits(self, limits: Sequence[RateLimit]) -> None:
        self._execute("keep_rate_limits", limit_params(limits))

    def known_tenants(self, tenants: Sequence[str]) -> set[str]:
        cur = self._execute("known_tenants", {"tenants": list(tenants)})
        return {row[0] for row in cur}

    def register_tenants(self, tenants: Sequence[str]) -> None:
        self._execute("register_tenants", {"tenants": sorted(tenants)})

    def take_tokens(
        self, limits: Sequence[RateLimit], wants: Sequence[int], held: Sequence[bool]
    ) -> Taken:
        params = {**limit_params(limits), "wants": list(wants), "held": list(held)}
        got = {
            (scope, name): (granted, available)
            for scope, name, granted, available in self._execute("take_tokens", params)
        }
        # A limit missing (forgotten while no relay had it) gives nothing until the next
        # heartbeat brings it back (keep_rate_limits).
        found = [got.get((limit.scope, limit.name), (0, 0.0)) for limit in limits]
        return Taken([g for g, _ in found], [a for _, a in found])

    def return_tokens(self, limits: Sequence[RateLimit], unused: Sequence[int]) -> None:
        self._execute("return_tokens", {**limit_params(limits), "unused": list(unused)})

    # -- gauges and retention

    def pending_stats(self, buckets: frozenset[int]) -> Backlog:
        if not buckets:
            return Backlog()
        groups = self._execute("pending_stats", {"buckets": self._bucket_array(buckets)})
        return Backlog(((row[0], row[1]), PendingStats(*row[2:])) for row in groups)

    # -- scheduled delivery (relay.promoter)

    def promote_due(self, limit: int) -> int:
        conn = self.connect()
        with conn.transaction():
            promoted = one_row(conn.execute(self._q("promote_due"), {"limit": limit}))[0]
            if promoted:
                conn.execute(self._q("wake_relays"), {"schema": self._schema or "public"})
        return promoted

    def next_due(self) -> float | None:
        return one_row(self._execute("next_due", {}))[0]

    def scheduled_count(self) -> int:
        return one_row(self._execute("scheduled_count", {}))[0]

    def delete_confirmed(self, older_than_seconds: float, limit: int) -> int:
        cur = self._execute(
            "delete_confirmed", {"older_than_seconds": older_than_seconds, "limit": limit}
        )
        return cur.rowcount
