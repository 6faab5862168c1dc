-- Named SQL blocks of the writer side, loaded once by outbox.sql. `{table}` is the
-- schema-qualified local_message table, quoted by psycopg.sql.

-- name: lock_keys
-- Serialises writers of the same keys until their transactions end, so that id order per key
-- equals commit order (docs/writing-events.md). Sorted to avoid deadlocks between writers.
SELECT count(pg_advisory_xact_lock(%(namespace)s, k))
  FROM (SELECT DISTINCT k FROM unnest(%(lock_ids)s::integer[]) AS k ORDER BY k) AS keys

-- name: insert_messages
-- Every row in one statement: publish_many() costs one round trip whatever the count. The
-- arrays go in binary format: as text, psycopg quoted and escaped every element in Python, a
-- third of the writer's CPU per event (bench/writer_cost.py).
-- Scheduled rows: the due time is deliver_at as given, or delay from this INSERT by the
-- database's clock (statement_timestamp(), not the transaction's start), the one the promoter
-- compares with (relay/queries.sql, promote_due). A row due later than that is SCHEDULED, out
-- of the relay's read until promoted; the rest are PENDING at once. When no row is scheduled the two arrays are empty, and unnest() pads
-- them with NULLs.
INSERT INTO {table} (message_id, topic, key, payload, headers, dedup_key, tenant, status,
                     deliver_at)
SELECT m, t, k, p, h::jsonb, d, n,
       CASE WHEN w.due > statement_timestamp() THEN 'SCHEDULED' ELSE 'PENDING' END, w.due
  FROM unnest(%(message_ids)b::uuid[], %(topics)b::text[], %(keys)b::bytea[],
              %(payloads)b::bytea[], %(headers)b::text[], %(dedup_keys)b::text[],
              %(tenants)b::text[], %(deliver_ats)b::timestamptz[], %(delays)b::float8[])
       AS u(m, t, k, p, h, d, n, a, s)
 CROSS JOIN LATERAL (SELECT coalesce(a, statement_timestamp() + make_interval(secs => s)) AS due)
       AS w
    ON CONFLICT (tenant, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
RETURNING id, message_id

-- name: find_by_dedup_keys
-- The rows that hold these (tenant, dedup_key) pairs.
SELECT m.id, m.message_id, m.tenant, m.dedup_key
  FROM {table} m
  JOIN unnest(%(tenants)s::text[], %(dedup_keys)s::text[]) AS u(tenant, dedup_key)
    ON m.tenant = u.tenant AND m.dedup_key = u.dedup_key
