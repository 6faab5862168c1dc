-- Named SQL blocks of the relay, loaded once by outbox.sql. `{table}` is the qualified
-- local_message table, `{bucket_table}` and `{relay_table}` its lease tables.

-- name: heartbeat
-- The relay says it is alive; its lease on itself lasts lease_seconds.
INSERT INTO {relay_table} (relay_id, name, lease_until)
VALUES (%(relay_id)s, %(name)s, now() + make_interval(secs => %(lease_seconds)s))
ON CONFLICT (relay_id) DO UPDATE
   SET heartbeat_at = now(), lease_until = EXCLUDED.lease_until
RETURNING (SELECT count(*) FROM {relay_table} r
            WHERE r.lease_until > now() AND r.relay_id <> %(relay_id)s) + 1 AS alive,
          (SELECT count(*) FROM {relay_table} r
            WHERE r.lease_until > now() AND r.relay_id < %(relay_id)s) AS rank

-- name: renew_buckets
UPDATE {bucket_table}
   SET lease_until = now() + make_interval(secs => %(lease_seconds)s)
 WHERE owner = %(relay_id)s
RETURNING bucket

-- name: release_buckets
UPDATE {bucket_table} SET owner = NULL, lease_until = NULL
 WHERE owner = %(relay_id)s AND bucket = ANY(%(buckets)s::smallint[])

-- name: acquire_shards
-- Whole shards (`width` consecutive buckets; 1 in at-least-once mode) every bucket of which is
-- free, or leased by an owner that let the lease expire (it died or was paused). The free
-- buckets are locked first, skipping those another relay is taking at this moment; of those,
-- only complete shards are taken.
WITH free AS (
    SELECT bucket FROM {bucket_table}
     WHERE owner IS NULL OR lease_until < now()
     ORDER BY bucket
       FOR UPDATE SKIP LOCKED
), whole AS (
    SELECT bucket / %(width)s AS shard FROM free
     GROUP BY 1 HAVING count(*) = %(width)s
     ORDER BY 1
     LIMIT %(count)s
)
UPDATE {bucket_table} b
   SET owner = %(relay_id)s, lease_until = now() + make_interval(secs => %(lease_seconds)s)
  FROM free
 WHERE b.bucket = free.bucket AND free.bucket / %(width)s IN (SELECT shard FROM whole)
RETURNING b.bucket

-- name: forget_relay
DELETE FROM {relay_table} WHERE relay_id = %(relay_id)s

-- name: read_in_id_order
-- Run before fetch_pending, in its transaction. Without statistics for the PENDING rows (a table
-- bulk-loaded and not yet analysed) the planner takes them for a handful: it fetched every
-- PENDING row and sorted them to return the first 2,000 (200 ms per batch with 200,000 rows,
-- growing with the backlog it should drain, bench/run.py --no-analyze). With sorts priced out,
-- the read walks each group's part of the PENDING index in id order and stops at its LIMIT
-- whatever the statistics say (tests/integration/test_store_plans.py); the sorts left are of
-- the few rows picked. For this transaction only: the relay's other statements (retention's
-- ORDER BY id, say) keep every plan open to them. Sorts priced out make every plan with a sort
-- look costly enough for JIT compilation, which spent 0.8 s compiling a read that runs in
-- milliseconds: JIT is off for this transaction too. And random page reads are priced as
-- sequential ones (random_page_cost 1): the read touches the newest pages of the table and of
-- its small PENDING index, which are in memory. At the default price (4) the wider PENDING
-- index's pages looked dearer than the primary key's, and with statistics from before a
-- drain (every row PENDING) the planner walked the primary key in id order through the
-- delivered rows: 90 ms a read with 120,000 of 200,000 rows delivered, instead of 14
-- (tests/integration/test_store_plans.py).
SELECT set_config('enable_sort', 'off', true), set_config('jit', 'off', true),
       set_config('random_page_cost', '1', true)

-- name: blocking_keys
-- Head-of-key blocking: the keys of the buckets that hold their later rows back, each with its
-- first blocking row (FAILED, SENT, or PENDING and waiting for its retry). A key's rows are
-- one sequence per tenant: tenants that use the same key do not hold each other back.
-- fetch_pending and pending_stats name this block (outbox.sql.query puts it in): what the
-- relay skips and what the lag leaves out are one rule.
SELECT tenant, key, min(id) AS first_id
  FROM {table}
 WHERE bucket = ANY(%(buckets)s::smallint[]) AND key IS NOT NULL
   AND (status IN ('FAILED', 'SENT')
        OR (status = 'PENDING' AND next_attempt_at IS NOT NULL AND next_attempt_at > now()))
 GROUP BY tenant, key

-- name: fetch_pending
-- The next deliverable rows of the relay's buckets, fair across (tenant, topic) groups: each
-- group with rows waiting takes turns, its rows in id order, so a tenant (or a topic) with a
-- backlog of a million rows delays another's new rows by one batch, not by the backlog.
--   groups: the (tenant, topic) pairs with PENDING rows, found by skipping along the PENDING
--     index (one descent per group, however many rows each holds), from its end: each step
--     lands on a group's newest row, which is PENDING; from the start it landed on a group's
--     oldest entries, those of rows delivered since the last vacuum, and stepped over them
--     all, at every read;
--   live: the groups not left out by a rate limit that has no tokens left (skip_tenants,
--     skip_topics: relay.rate_limits); their rows are not read at all;
--   share: how far each group's rows are read: the batch, split over the groups, four times
--     over (a group with fewer rows than its share leaves room that the others fill), and
--     never more than the batch: at most four batches' worth of rows are read in all;
--   first: each group's first deliverable rows in id order, numbered (turn 1, 2, ...);
--   full_groups, top_up, more: when that falls short of the batch (groups whose rows are all
--     held or waiting count in the split, and give nothing), the groups that filled their
--     share read on from their last row, the shortfall split over them four times over (turns
--     after the share). At most four batches' worth of rows more are read, and only then;
--   the batch: the first LIMIT rows by turn, then in id order. A group's rows are a prefix of
--     its deliverable rows, so a key's rows (one tenant's) go in id order within a topic.
-- A key whose oldest unfinished row waits for a retry or is FAILED is held back entirely
-- (blocking_keys). `exclude`: the rows of the batch in flight while this one is read ahead
-- (relay.relay). As NOT IN (subquery) it is one hashed lookup per row, in a generic plan too;
-- `<> ALL(array)` compared each row with every id of the array (72 ms instead of 13 for 2,000
-- ids).
WITH RECURSIVE blockers AS MATERIALIZED ({blocking_keys}),
groups AS (
    (SELECT tenant, topic FROM {table} WHERE status = 'PENDING'
      ORDER BY tenant DESC, topic DESC LIMIT 1)
    UNION ALL
    SELECT lower.tenant, lower.topic
      FROM groups g
     CROSS JOIN LATERAL (SELECT tenant, topic FROM {table}
                          WHERE status = 'PENDING' AND (tenant, topic) < (g.tenant, g.topic)
                          ORDER BY tenant DESC, topic DESC LIMIT 1) AS lower
),
live AS (
    SELECT tenant, topic FROM groups
     WHERE tenant <> ALL(%(skip_tenants)s::text[]) AND topic <> ALL(%(skip_topics)s::text[])
),
share AS (
    SELECT least(%(limit)s, ceil(4.0 * %(limit)s / count(*)))::integer AS rows FROM live
),
first AS (
    SELECT r.*
      FROM live g
     CROSS JOIN LATERAL (
        SELECT row_number() OVER (ORDER BY m.id) AS turn, m.id, m.message_id::text, m.topic,
               m.key, m.payload, m.headers, m.attempts, m.created_at, m.bucket, m.tenant
          FROM {table} m
         WHERE m.status = 'PENDING' AND m.tenant = g.tenant AND m.topic = g.topic
           AND {deliverable}
         ORDER BY m.id
         LIMIT (SELECT rows FROM share)) AS r
),
full_groups AS (
    SELECT tenant, topic, max(id) AS last_id FROM first
     GROUP BY tenant, topic
    HAVING count(*) = (SELECT rows FROM share)
),
top_up AS (
    SELECT least(%(limit)s, ceil(4.0 * (%(limit)s - (SELECT count(*) FROM first)) / count(*)))
           ::integer AS rows
      FROM full_groups
    HAVING count(*) > 0 AND (SELECT count(*) FROM first) < %(limit)s
),
more AS (
    SELECT r.*
      FROM full_groups f
     CROSS JOIN LATERAL (
        SELECT (SELECT rows FROM share) + row_number() OVER (ORDER BY m.id) AS turn, m.id,
               m.message_id::text, m.topic, m.key, m.payload, m.headers, m.attempts,
               m.created_at, m.bucket, m.tenant
          FROM {table} m
         WHERE m.status = 'PENDING' AND m.tenant = f.tenant AND m.topic = f.topic
           -- on from the group's last row, as one condition of the PENDING index: as
           -- `m.id > f.last_id` it was a range of the primary key, and the read walked it
           AND (m.tenant, m.topic, m.id) > (f.tenant, f.topic, f.last_id) AND {deliverable}
         ORDER BY m.id
         LIMIT coalesce((SELECT rows FROM top_up), 0)) AS r
)
SELECT id, message_id, topic, key, payload, headers, attempts, created_at, bucket, tenant
  FROM (SELECT * FROM first UNION ALL SELECT * FROM more ORDER BY turn, id LIMIT %(limit)s)
       AS batch
 ORDER BY id

-- name: deliverable
-- A PENDING row `m` of the relay's buckets that may be sent now: not waiting for its retry, not
-- behind its key's blocking row (blockers, fetch_pending's), not in the batch in flight.
m.bucket = ANY(%(buckets)s::smallint[])
AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= now())
AND NOT EXISTS (SELECT 1 FROM blockers b
                 WHERE b.key = m.key AND b.tenant = m.tenant AND b.first_id < m.id)
AND m.id NOT IN (SELECT unnest(%(exclude)s::bigint[]))

-- name: mark_confirmed
-- last_error says why a row is not delivered yet: a delivered row has none (attempts still
-- counts what it took).
-- `status COLLATE "C" = 'PENDING'` is `status = 'PENDING'` (equality of text is the same in
-- every deterministic collation), spelt so that it does not match the PENDING index's
-- predicate: with statistics taken before a backlog built up, the planner took that index
-- for empty and scanned all of it, with `id = ANY(ids)` as a filter, at every write (the
-- index leads with tenant and topic, so ids cannot be its condition). The same in
-- confirm_from_kafka and record_failures; tests/integration/test_store_plans.py holds it.
-- Only rows of buckets this relay still owns: a relay that lost its lease cannot overwrite
-- the new owner's work (the owned buckets are read once, as an InitPlan).
-- The rows are found by `id = ANY(ids)` (an index condition on the primary key and on the
-- PENDING index) and each row's partition and offset looked up in a JSON object by id: no
-- join the planner could get wrong. Joined with unnest(ids, partitions, offsets), statistics
-- taken before a backlog built up (a fresh table, an outage) let it hash every PENDING row
-- per batch (300 ms with 200,000 rows), or loop over the whole array for each row of the
-- table (40 s with 60,000; tests/integration/test_store_plans.py).
UPDATE {table} m
   SET status = 'CONFIRMED', delivered_at = now(), next_attempt_at = NULL, last_error = NULL,
       kafka_partition = (%(places)s::jsonb -> m.id::text ->> 0)::integer,
       kafka_offset = (%(places)s::jsonb -> m.id::text ->> 1)::bigint
 WHERE m.id = ANY(%(ids)s::bigint[]) AND m.status COLLATE "C" = 'PENDING'
   AND m.bucket = ANY(ARRAY(SELECT b.bucket FROM {bucket_table} b
                             WHERE b.owner = %(relay_id)s))

-- name: confirm_from_kafka
-- Exactly-once recovery: rows a committed progress record names, by id and by the last 8
-- bytes of their message_id (`tags` maps each id to those, in hex); a row whose id matches
-- but whose message_id does not (a restored or recreated table) is left PENDING and sent.
-- The same ownership rule and lookup by id as mark_confirmed; no partition or offset is known.
UPDATE {table} m
   SET status = 'CONFIRMED', delivered_at = now(), next_attempt_at = NULL, last_error = NULL
 WHERE m.id = ANY(%(ids)s::bigint[]) AND m.status COLLATE "C" = 'PENDING'
   AND encode(substring(uuid_send(m.message_id) FROM 9), 'hex') = %(tags)s::jsonb ->> m.id::text
   AND m.bucket = ANY(ARRAY(SELECT b.bucket FROM {bucket_table} b
                             WHERE b.owner = %(relay_id)s))

-- name: record_failures
-- attempts counts message-specific failures only; an outage does not burn attempts. Same
-- ownership rule and the same lookup by id as mark_confirmed; `outcomes` maps each id to
-- [counted, error, give_up, delay_seconds].
UPDATE {table} m
   SET attempts = m.attempts + (%(outcomes)s::jsonb -> m.id::text ->> 0)::integer,
       last_error = %(outcomes)s::jsonb -> m.id::text ->> 1,
       status = CASE WHEN (%(outcomes)s::jsonb -> m.id::text ->> 2)::boolean
                     THEN 'FAILED' ELSE 'PENDING' END,
       next_attempt_at = CASE WHEN (%(outcomes)s::jsonb -> m.id::text ->> 2)::boolean THEN NULL
                              ELSE now() + make_interval(
                                  secs => (%(outcomes)s::jsonb -> m.id::text ->> 3)::float8)
                         END
 WHERE m.id = ANY(%(ids)s::bigint[]) AND m.status COLLATE "C" = 'PENDING'
   AND m.bucket = ANY(ARRAY(SELECT b.bucket FROM {bucket_table} b
                             WHERE b.owner = %(relay_id)s))

-- name: pending_stats
-- For the gauges and `outbox status` (over all buckets), per tenant and topic: rows waiting in the
-- buckets, how many of them are held behind a blocked key, and the age of the oldest one that
-- may be sent now: the lag. Rows in backoff and the rows they or a FAILED row hold back wait
-- on purpose, and are not lag: a poisoned key shows as a blocked key, not as a lagging relay.
-- One pass over the PENDING rows, hash-joined to the blocking keys (one row per key, computed
-- once: MATERIALIZED). As a correlated EXISTS the blocking query ran once per PENDING row:
-- 7 s a renewal with 30,000 rows waiting, longer than a lease allows.
WITH blockers AS MATERIALIZED ({blocking_keys})
SELECT m.tenant, m.topic, count(*), count(*) FILTER (WHERE b.first_id < m.id),
       extract(epoch FROM now() - min(m.created_at) FILTER (
           WHERE (m.next_attempt_at IS NULL OR m.next_attempt_at <= now())
             AND (b.first_id IS NULL OR b.first_id >= m.id)))::double precision
  FROM {table} m
  LEFT JOIN blockers b ON b.key = m.key AND b.tenant = m.tenant
 WHERE m.status = 'PENDING' AND m.bucket = ANY(%(buckets)s::smallint[])
 GROUP BY m.tenant, m.topic

-- name: delete_confirmed
-- Retention, one small batch at a time: short locks, and rows another relay is deleting are
-- skipped rather than waited for.
DELETE FROM {table}
 WHERE id IN (SELECT id FROM {table}
               WHERE status = 'CONFIRMED'
                 AND created_at < now() - make_interval(secs => %(older_than_seconds)s)
               ORDER BY id
               LIMIT %(limit)s
                 FOR UPDATE SKIP LOCKED)

-- name: set_rate_limits
-- At start: the relay's limits, each with a full bucket if new (a changed rate or burst
-- applies at once, tokens over the new burst dropped); limits no relay has drawn on for a
-- minute and that are not this relay's are forgotten (a limit taken out of the configuration
-- while other relays still run with it stays until they stop).
WITH wanted AS (
    SELECT * FROM unnest(%(scopes)s::text[], %(names)s::text[], %(rates)s::float8[],
                         %(bursts)s::float8[]) AS w(scope, name, rate, burst)
), forgotten AS (
    DELETE FROM {rate_table} r
     WHERE r.refilled_at < now() - interval '1 minute'
       AND NOT EXISTS (SELECT 1 FROM wanted w WHERE w.scope = r.scope AND w.name = r.name)
)
INSERT INTO {rate_table} AS r (scope, name, rate, burst, tokens)
SELECT scope, name, rate, burst, burst FROM wanted ORDER BY scope, name
    ON CONFLICT (scope, name) DO UPDATE
   SET rate = EXCLUDED.rate, burst = EXCLUDED.burst, tokens = least(r.tokens, EXCLUDED.burst)

-- name: known_tenants
-- Which of these tenants have written events (or were listed by an operator).
SELECT tenant FROM {tenant_table} WHERE tenant = ANY(%(tenants)s::text[])

-- name: take_tokens
-- Before a read: each limit's bucket refilled for the time since its last refill (RATE a
-- second, up to BURST), and up to `want` whole tokens taken from it; returns what each gave
-- and what it held. The rows are locked first, in one order, so that relays taking from
-- several limits at once wait on each other instead of deadlocking; the refill is computed
-- from the locked row (SET reads the latest version), never from a snapshot another relay has
-- changed since. statement_timestamp() is the refill's clock, and refilled_at never goes
-- back: a relay whose statement started before another's refill counts no time twice.
WITH wanted AS (
    SELECT * FROM unnest(%(scopes)s::text[], %(names)s::text[], %(rates)s::float8[],
                         %(bursts)s::float8[]) AS w(scope, name, rate, burst)
), locked AS (
    SELECT r.scope, r.name FROM {rate_table} r JOIN wanted w USING (scope, name)
     ORDER BY r.scope, r.name
       FOR UPDATE OF r
)
UPDATE {rate_table} r
   SET last_taken = least(%(want)s, floor({available})),
       tokens = {available} - least(%(want)s, floor({available})),
       refilled_at = greatest(r.refilled_at, statement_timestamp()),
       rate = w.rate, burst = w.burst
  FROM wanted w
 WHERE r.scope = w.scope AND r.name = w.name
   AND (r.scope, r.name) IN (SELECT scope, name FROM locked)
RETURNING r.scope, r.name, r.last_taken::integer, r.tokens + r.last_taken

-- name: available
-- A limit's tokens now: what was left, refilled at its rate since, up to its burst.
least(w.burst, r.tokens + w.rate * greatest(0.0, extract(epoch FROM statement_timestamp()
                                                          - r.refilled_at)::float8))

-- name: return_tokens
-- After a read: the tokens taken and not used go back (up to the burst), and the limits that
-- held rows back say when, for `outbox status`.
WITH given AS (
    SELECT * FROM unnest(%(scopes)s::text[], %(names)s::text[], %(unused)s::float8[],
                         %(held)s::boolean[]) AS g(scope, name, unused, held)
), locked AS (
    SELECT r.scope, r.name FROM {rate_table} r JOIN given g USING (scope, name)
     ORDER BY r.scope, r.name
       FOR UPDATE OF r
)
UPDATE {rate_table} r
   SET tokens = least(r.burst, r.tokens + g.unused),
       held_at = CASE WHEN g.held THEN statement_timestamp() ELSE r.held_at END
  FROM given g
 WHERE r.scope = g.scope AND r.name = g.name
   AND (r.scope, r.name) IN (SELECT scope, name FROM locked)

-- name: promote_due
-- Scheduled delivery: up to `limit` SCHEDULED rows whose time has come become PENDING, the
-- earliest due first, through the scheduled index (deliver_at, id). Rows another relay's
-- promoter (or an operator's skip) has locked are skipped, not waited for. A promoted row
-- takes its place in its key's order from now on: among the key's rows not yet delivered it
-- goes by id, and it holds nothing back while it waits (docs/guarantees.md).
WITH due AS (
    SELECT id FROM {table}
     WHERE status = 'SCHEDULED' AND deliver_at <= now()
     ORDER BY deliver_at, id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), promoted AS (
    UPDATE {table} m SET status = 'PENDING'
      FROM due
     WHERE m.id = due.id
    RETURNING m.id
)
SELECT count(*) FROM promoted

-- name: wake_relays
-- After a promotion, in its transaction (sent at its commit): the insert trigger's NOTIFY
-- (schema.sql, local_message_notify; relay/listener.py's CHANNEL), so that idle relays read
-- the promoted rows at once instead of at their next poll.
SELECT pg_notify('outbox_local_message', %(schema)s)

-- name: next_due
-- Seconds until the earliest SCHEDULED row falls due (0 or less: due now), NULL when none:
-- the first entry of the scheduled index.
SELECT extract(epoch FROM min(deliver_at) - now())::double precision
  FROM {table}
 WHERE status = 'SCHEDULED'

-- name: scheduled_count
-- For the outbox_scheduled_messages gauge: an index-only count over the scheduled index.
SELECT count(*) FROM {table} WHERE status = 'SCHEDULED'
