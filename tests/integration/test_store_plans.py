"""How PostgreSQL runs the relay's statements when the table's statistics are out of date:
a write costs its batch, not the backlog (bench/stalls.py found writes of seconds, then a
60 s statement timeout, at 10,000 msgs/s on a fresh table)."""

import re
import uuid

import psycopg
from psycopg import sql

import outbox
from outbox.sql import query
from relay.model import Delivered, FailureUpdate
from relay.store import PostgresStore, confirm_params, failure_params

ALL = frozenset(range(256))


def test_the_relay_never_runs_a_generic_plan_made_for_an_earlier_table(dsn):
    """A generic plan is chosen after five runs of a prepared statement, from the statistics
    of that moment, and kept: made while the table held a few rows, it joined each batch
    against every row once a backlog had grown."""
    store = PostgresStore(dsn)
    relay_id = uuid.uuid4()
    try:
        store.heartbeat(relay_id, "r", 60)
        for _ in range(8):
            with psycopg.connect(dsn) as conn, conn.transaction():
                outbox.publish_many(
                    conn, [dict(topic="t", key=f"k{i}", payload={}) for i in range(3)]
                )
            batch = store.fetch_pending(ALL, 100)
            assert store.mark_confirmed(relay_id, [Delivered(m.id, 0, m.id) for m in batch]) == 3
        used = (
            store.connect()
            .execute("SELECT sum(custom_plans), sum(generic_plans) FROM pg_prepared_statements")
            .fetchone()
        )
        assert used[0] >= 16 and used[1] == 0, used
    finally:
        store.close()


def _plan(conn: psycopg.Connection, name: str, params: dict, before: str | None = None) -> str:
    conn.execute("BEGIN")
    try:
        if before is not None:  # another named block first, in the same transaction
            conn.execute(query("relay", "queries.sql", before, None))
        lines = conn.execute(
            sql.SQL("EXPLAIN ") + query("relay", "queries.sql", name, None), params
        ).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return "\n".join(line[0] for line in lines)


def test_outcomes_are_written_row_by_id_with_a_backlog_the_statistics_do_not_know(dsn):
    """After an outage: ANALYZE saw a table with nothing PENDING, then 60,000 rows arrived.
    Joined with unnest(ids, ...), the planner took the PENDING rows for a handful and looped
    over the batch's array for each of them (40 s for one write here)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # No autovacuum: its ANALYZE would make the statistics right in the middle of the test.
        conn.execute("ALTER TABLE local_message SET (autovacuum_enabled = off)")
        fill = (
            "INSERT INTO local_message (topic, key, payload, status, delivered_at) "
            "SELECT 't', convert_to('k' || (i %% 1000), 'UTF8'), '\\x7b7d', %s, %s "
            "FROM generate_series(1, %s) AS i"
        )
        conn.execute(fill, ("CONFIRMED", "now", 3000))
        conn.execute("ANALYZE local_message")
        conn.execute(fill, ("PENDING", None, 60_000))
    store = PostgresStore(dsn)
    relay_id = uuid.uuid4()
    try:
        store.heartbeat(relay_id, "r", 60)
        ids = [m.id for m in store.fetch_pending(ALL, 2000)]
        conn = store.connect()
        confirm = _plan(
            conn, "mark_confirmed", confirm_params(relay_id, [Delivered(i, 0, i) for i in ids])
        )
        fail = _plan(
            conn,
            "record_failures",
            failure_params(relay_id, [FailureUpdate(i, 1, "x", False, 1.0) for i in ids]),
        )
    finally:
        store.close()
    for plan in (confirm, fail):
        # The batch's ids are the index condition of the primary key; no join, no scan of the
        # table or of the PENDING index (which leads with tenant and topic: with these
        # statistics the planner took it for empty and scanned all of it, ids as a filter).
        assert "Index Cond: (id = ANY" in plan, plan
        assert "local_message_pkey" in plan and "pending_group_idx" not in plan, plan
        assert (
            "Join" not in plan
            and "Nested Loop" not in plan
            and "Seq Scan on local_message m" not in plan
        ), plan


def test_each_row_gets_its_own_outcome_whatever_its_text(dsn):
    """The outcomes travel as a JSON object keyed by id: each row gets its own values, an
    error text keeps its quotes, backslashes and non-ASCII (NUL, which PostgreSQL's text
    cannot hold, is dropped), and a Kafka offset keeps all its digits."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish_many(conn, [dict(topic="t", key=f"k{i}", payload={}) for i in range(4)])
    store = PostgresStore(dsn)
    relay_id = uuid.uuid4()
    try:
        store.heartbeat(relay_id, "r", 60)
        a, b, c, d = (m.id for m in store.fetch_pending(ALL, 10))
        assert store.mark_confirmed(relay_id, [Delivered(a, 5, 2**62 + 1), Delivered(b, 0, 7)]) == 2
        text = 'broker said "no" \\ é\x00!'
        assert (
            store.record_failures(
                relay_id,
                [FailureUpdate(c, 1, text, False, 30.0), FailureUpdate(d, 0, "gone", True, 0.0)],
            )
            == 2
        )
    finally:
        store.close()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, status, kafka_partition, kafka_offset, attempts, last_error, "
            "next_attempt_at - now() BETWEEN interval '25 seconds' AND interval '31 seconds' "
            "FROM local_message ORDER BY id"
        ).fetchall()
    assert rows == [
        (a, "CONFIRMED", 5, 2**62 + 1, 0, None, None),
        (b, "CONFIRMED", 0, 7, 0, None, None),
        (c, "PENDING", None, None, 1, 'broker said "no" \\ é!', True),
        (d, "FAILED", None, None, 0, "gone", None),
    ]


def test_the_read_walks_the_pending_index_on_a_table_never_analysed(dsn):
    """A backlog bulk-loaded and not analysed yet: the planner took the PENDING rows for a
    handful, fetched all of them and sorted them for the first 2,000 of each batch (200 ms per
    read with 200,000 rows: the drain slowed to half, bench/run.py --no-analyze). The store
    reads with sorts priced out: an ordered walk of the PENDING index that stops at LIMIT. (The
    fair read, a walk per (tenant, topic) group, is planned so by this PostgreSQL even without
    the setting; it stays, for the planners that would not.)"""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE local_message SET (autovacuum_enabled = off)")
        conn.execute(
            "INSERT INTO local_message (topic, key, payload) "
            "SELECT 't', convert_to('k' || (i % 1000), 'UTF8'), '\\x7b7d' "
            "FROM generate_series(1, 30000) AS i"
        )
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_stats WHERE tablename = 'local_message'"
            ).fetchone()[0]
            == 0
        ), "the table must have no statistics"
    store = PostgresStore(dsn)
    try:
        conn = store.connect()
        params = {
            "buckets": "{" + ",".join(map(str, sorted(ALL))) + "}",
            "limit": 2000,
            "exclude": "{}",
            "cap_tenants": [],
            "tenant_caps": [],
            "cap_topics": [],
            "topic_caps": [],
        }
        guarded = _plan(conn, "fetch_pending", params, before="read_in_id_order")
        # The store's own read runs the guarded plan: the setting, then the read, in one
        # transaction that ends with it.
        ran: list[tuple[str, psycopg.pq.TransactionStatus]] = []
        execute = conn.execute

        def spy(statement, *args, **kwargs):
            cursor = execute(statement, *args, **kwargs)
            text = statement.as_string(conn) if hasattr(statement, "as_string") else str(statement)
            # In autocommit, SET LOCAL outside a transaction only warns: it must run inside.
            ran.append((text, conn.info.transaction_status))
            return cursor

        conn.execute = spy  # type: ignore[method-assign]
        batch = store.fetch_pending(ALL, 2000)
        conn.execute = execute  # type: ignore[method-assign]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        store.close()
    assert len(ran) == 2, ran
    assert "set_config('enable_sort', 'off', true)" in ran[0][0] and "ORDER BY m.id" in ran[1][0]
    assert all(status == psycopg.pq.TransactionStatus.INTRANS for _, status in ran), ran
    # Each (tenant, topic) group's rows are an ordered walk of the PENDING index that stops at
    # the group's share: no sort of the group's rows, and no JIT compilation (priced-out sorts
    # made the read look costly enough for it: 0.8 s of compiling a read of milliseconds).
    assert "Sort Key: m.id" not in guarded, guarded
    assert "Index Scan using local_message_pending_group_idx on local_message m" in guarded, guarded
    assert re.search(
        r"Index Cond: \(\(tenant = g\w*\.tenant\) AND \(topic = g\w*\.topic\)\)", guarded
    )
    # The top-up reads on along the same index, not along the primary key.
    assert "Index Cond: ((ROW(tenant, topic, id) > ROW(f.tenant, f.topic, f.last_id))" in guarded
    assert "JIT" not in guarded, guarded
    assert [m.id for m in batch] == sorted(m.id for m in batch) and len(batch) == 2000


def test_the_gauges_read_the_backlog_once_however_many_rows_wait(dsn):
    """pending_stats runs at every lease renewal: it must read the PENDING rows once, with the
    blocking keys computed once. As a correlated subquery per row it took 7 s with 30,000
    rows waiting, longer than a renewal may take."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO local_message (topic, key, payload) "
            "SELECT 't', convert_to('k' || (i % 1000), 'UTF8'), '\\x7b7d' "
            "FROM generate_series(1, 30000) AS i"
        )
        conn.execute(
            "UPDATE local_message SET status = 'FAILED' WHERE id IN "
            "(SELECT min(id) FROM local_message GROUP BY key LIMIT 10)"
        )
        conn.execute("ANALYZE local_message")
        plan = _plan(conn, "pending_stats", {"buckets": list(range(256))})
    assert "SubPlan" not in plan, plan
    assert plan.count("Seq Scan on local_message") + plan.count("Index") >= 1
    store = PostgresStore(dsn)
    try:
        stats = store.pending_stats(ALL).total()
    finally:
        store.close()
    # 10 keys blocked by their first row: their 29 later rows each are held.
    assert (stats.pending, stats.held) == (29_990, 290) and stats.lag_seconds is not None


def test_the_read_walks_the_pending_index_through_a_drain_the_statistics_do_not_know(dsn):
    """Statistics taken when every row was PENDING, then most of them delivered: the primary
    key, narrower than the PENDING index, looked the cheaper way to read in id order, and the
    read walked every delivered row before the first PENDING one (90 ms a read with 120,000 of
    200,000 delivered). The store's read prices random page reads as sequential ones."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE local_message SET (autovacuum_enabled = off)")
        conn.execute(
            "INSERT INTO local_message (topic, key, payload) "
            "SELECT 'payments.settled', convert_to('k' || (i % 1000), 'UTF8'), "
            "convert_to(repeat('x', 256), 'UTF8') FROM generate_series(1, 60000) AS i"
        )
        conn.execute("ANALYZE local_message")
        conn.execute("UPDATE local_message SET status = 'CONFIRMED' WHERE id <= 40000")
    store = PostgresStore(dsn)
    try:
        params = {
            "buckets": list(range(256)),
            "limit": 2000,
            "exclude": [],
            "cap_tenants": [],
            "tenant_caps": [],
            "cap_topics": [],
            "topic_caps": [],
        }
        guarded = _plan(store.connect(), "fetch_pending", params, before="read_in_id_order")
        batch = store.fetch_pending(ALL, 2000)
    finally:
        store.close()
    assert "Index Scan using local_message_pending_group_idx on local_message m" in guarded, guarded
    assert "local_message_pkey on local_message m" not in guarded, guarded
    assert [m.id for m in batch] == list(range(40001, 42001))
