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
--   capped, live: how many rows of each group the rate limits' tokens may cover
--     (relay.rate_limits: cap_tenants and tenant_caps, cap_topics and topic_caps; the batch
--     for a group no limit applies to); the groups capped at 0 are left out, their rows not
--     read at all, and named at the end of the result;
--   share: how far each group's rows are read: the batch, split over the groups, four times
--     over (a group with fewer rows than its share leaves room that the others fill), and
--     never more than the batch: at most four batches' worth of rows are read in all;
--   first: each group's first deliverable rows in id order, numbered (turn 1, 2, ...);
--   full_groups, top_up, more: when that falls short of the batch (groups whose rows are all
--     held or waiting count in the split, and give nothing), the groups that filled their
--     share read on from their last row, the shortfall split over them four times over (turns
--     after the share). At most four batches' worth of rows more are read, and only then;
--     A group's rows read on never go past its cap;
--   the batch: the first LIMIT rows by turn, then in id order. A group's rows are a prefix of
--     its deliverable rows, so a key's rows (one tenant's) go in id order within a topic.
-- A row's created_at is its due time if it was scheduled (greatest() skips a NULL): the
-- latencies the relay measures count from when a row could first be sent.
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
capped AS (
    SELECT g.tenant, g.topic,
           least(%(limit)s, coalesce(tc.cap, %(limit)s), coalesce(pc.cap, %(limit)s)) AS cap
      FROM groups g
      LEFT JOIN unnest(%(cap_tenants)s::text[], %(tenant_caps)s::integer[]) AS tc(name, cap)
        ON tc.name = g.tenant
      LEFT JOIN unnest(%(cap_topics)s::text[], %(topic_caps)s::integer[]) AS pc(name, cap)
        ON pc.name = g.topic
),
live AS (
    SELECT tenant, topic, cap FROM capped WHERE cap > 0
),
share AS (
    SELECT least(%(limit)s, ceil(4.0 * %(limit)s / count(*)))::integer AS rows FROM live
),
first AS (
    SELECT r.*
      FROM live g
     CROSS JOIN LATERAL (
        SELECT row_number() OVER (ORDER BY m.id) AS turn, m.id, m.message_id::text, m.topic,
               m.key, m.payload, m.headers, m.attempts,
               greatest(m.created_at, m.deliver_at) AS created_at, m.bucket, m.tenant
          FROM {table} m
         WHERE m.status = 'PENDING' AND m.tenant = g.tenant AND m.topic = g.topic
           AND {deliverable}
         ORDER BY m.id
         LIMIT least((SELECT rows FROM share), g.cap)) AS r
),
full_groups AS (
    SELECT f.tenant, f.topic, max(f.id) AS last_id, min(l.cap) AS cap
      FROM first f JOIN live l USING (tenant, topic)
     GROUP BY f.tenant, f.topic
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
               greatest(m.created_at, m.deliver_at) AS created_at, m.bucket, m.tenant
          FROM {table} m
         WHERE m.status = 'PENDING' AND m.tenant = f.tenant AND m.topic = f.topic
           -- on from the group's last row, as one condition of the PENDING index: as
           -- `m.id > f.last_id` it was a range of the primary key, and the read walked it
           AND (m.tenant, m.topic, m.id) > (f.tenant, f.topic, f.last_id) AND {deliverable}
         ORDER BY m.id
         LIMIT least(coalesce((SELECT rows FROM top_up), 0),
                     f.cap - (SELECT rows FROM share))) AS r
)
SELECT id, message_id, topic, key, payload, headers, attempts, created_at, bucket, tenant
  FROM (SELECT * FROM first UNION ALL SELECT * FROM more ORDER BY turn, id LIMIT %(limit)s)
       AS batch
 UNION ALL
-- The groups left out that have rows this relay could send now, marked by a NULL id (sorted
-- last): a rate limit holds those rows back (one probe of the PENDING index per group).
SELECT NULL, NULL, c.topic, NULL, NULL, NULL, NULL, NULL, NULL, c.tenant
  FROM capped c
 WHERE c.cap = 0
   AND EXISTS (SELECT 1 FROM {table} m
                WHERE m.status = 'PENDING' AND m.tenant = c.tenant AND m.topic = c.topic
                  AND {deliverable})
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
-- 7 s a renewal with 30,000 rows waiting, longer than a lease allows. A scheduled row's age
-- counts from its due time (greatest() skips a NULL deliver_at): a reminder written a month
-- ago and promoted now is not a month late.
WITH blockers AS MATERIALIZED ({blocking_keys})
SELECT m.tenant, m.topic, count(*), count(*) FILTER (WHERE b.first_id < m.id),
       extract(epoch FROM now() - min(greatest(m.created_at, m.deliver_at)) FILTER (
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
                 -- a scheduled row is kept as long after its due time (it was delivered
                 -- then, not when it was written)
                 AND (deliver_at IS NULL
                      OR deliver_at < now() - make_interval(secs => %(older_than_seconds)s))
               ORDER BY id
               LIMIT %(limit)s
                 FOR UPDATE SKIP LOCKED)

-- name: set_rate_limits
-- At start: the relay's limits in force for every relay (a changed rate or burst applies at
-- once; a new limit starts with a full bucket, a kept one loses the tokens over a new burst).
-- The other relays keep theirs (keep_rate_limits) and refill at the rates in this table.
WITH wanted AS (
    SELECT * FROM unnest(%(scopes)s::text[], %(names)s::text[], %(rates)s::float8[],
                         %(bursts)s::float8[]) AS w(scope, name, rate, burst)
), forgotten AS {forget_rate_limits}
INSERT INTO {rate_table} AS r (scope, name, rate, burst, tokens)
SELECT scope, name, rate, burst, burst FROM wanted ORDER BY scope, name
    ON CONFLICT (scope, name) DO UPDATE
   SET rate = EXCLUDED.rate, burst = EXCLUDED.burst, tokens = least(r.tokens, EXCLUDED.burst),
       seen_at = now()

-- name: keep_rate_limits
-- At each heartbeat: the relay's limits are still in use (seen_at). A limit missing (forgotten
-- while no relay had it) comes back with an empty bucket: never a burst more than its due.
WITH wanted AS (
    SELECT * FROM unnest(%(scopes)s::text[], %(names)s::text[], %(rates)s::float8[],
                         %(bursts)s::float8[]) AS w(scope, name, rate, burst)
), forgotten AS {forget_rate_limits}
INSERT INTO {rate_table} AS r (scope, name, rate, burst, tokens)
SELECT scope, name, rate, burst, 0 FROM wanted ORDER BY scope, name
    ON CONFLICT (scope, name) DO UPDATE SET seen_at = now()

-- name: forget_rate_limits
-- Named by set_rate_limits and keep_rate_limits, whose `wanted` are the relay's own limits:
-- the other limits no relay has said it uses for a minute (every relay says so at each
-- heartbeat) are out of every relay's configuration. Rows locked by a relay taking tokens are
-- skipped, not waited for (no lock order to keep with take_tokens).
DELETE FROM {rate_table}
 WHERE (scope, name) IN (SELECT x.scope, x.name FROM {rate_table} x
                          WHERE x.seen_at < now() - interval '1 minute'
                            AND NOT EXISTS (SELECT 1 FROM wanted w
                                             WHERE w.scope = x.scope AND w.name = x.name)
                            FOR UPDATE OF x SKIP LOCKED)

-- name: known_tenants
-- Which of these tenants are known: registered (relays register the tenants of the rows they
-- read; an operator may list one ahead), or with rows waiting (the PENDING index leads with
-- the tenant: one probe each).
SELECT t FROM unnest(%(tenants)s::text[]) AS t
 WHERE EXISTS (SELECT 1 FROM {tenant_table} k WHERE k.tenant = t)
    OR EXISTS (SELECT 1 FROM {table} m WHERE m.status = 'PENDING' AND m.tenant = t)

-- name: register_tenants
INSERT INTO {tenant_table} (tenant)
SELECT t FROM unnest(%(tenants)s::text[]) AS t ORDER BY t
    ON CONFLICT (tenant) DO NOTHING

-- name: take_tokens
-- After a read: each limit's bucket refilled at its rate for the time since its last refill
-- (up to its burst), and the tokens the batch's rows under it want taken, as many as there
-- are whole; returns what each gave and what it held. A limit that held rows back (gave less
-- than wanted, or its groups were left out of the read: `held`) says when, for `outbox
-- status`. The rows are locked first, in one order, so that relays taking from several
-- limits at once wait on each other instead of deadlocking; SET computes from the locked row
-- (its latest version), never from a snapshot another relay has changed since.
-- statement_timestamp() is the refill's clock; refilled_at never goes back, so that a relay
-- whose statement began before another's refill counts no time twice, unless it lies more
-- than a second ahead of the clock now (clock_timestamp(): a statement that waited long for
-- the lock is not a clock set back) - the database's clock was set back: the refill restarts
-- from now rather than stall the limit until the clock catches up.
WITH wanted AS (
    SELECT * FROM unnest(%(scopes)s::text[], %(names)s::text[], %(wants)s::integer[],
                         %(held)s::boolean[]) AS w(scope, name, want, held)
), locked AS (
    SELECT r.scope, r.name FROM {rate_table} r JOIN wanted w USING (scope, name)
     ORDER BY r.scope, r.name
       FOR UPDATE OF r
)
UPDATE {rate_table} r
   SET last_taken = least(w.want, floor({available})),
       tokens = {available} - least(w.want, floor({available})),
       refilled_at = CASE WHEN r.refilled_at > clock_timestamp() + interval '1 second'
                          THEN clock_timestamp()
                          ELSE greatest(r.refilled_at, statement_timestamp()) END,
       held_at = CASE WHEN w.held OR floor({available}) < w.want THEN statement_timestamp()
                      ELSE r.held_at END
  FROM wanted w
 WHERE r.scope = w.scope AND r.name = w.name
   AND (r.scope, r.name) IN (SELECT scope, name FROM locked)
RETURNING r.scope, r.name, r.last_taken::integer, r.tokens + r.last_taken

-- name: return_tokens
-- Tokens taken and not used (a row under two limits cut by the other's shortage) go back, up
-- to the burst; the rows locked in take_tokens' order.
WITH given AS (
    SELECT * FROM unnest(%(scopes)s::text[], %(names)s::text[], %(unused)s::integer[])
           AS g(scope, name, unused)
     WHERE unused > 0
), locked AS (
    SELECT r.scope, r.name FROM {rate_table} r JOIN given g USING (scope, name)
     ORDER BY r.scope, r.name
       FOR UPDATE OF r
)
UPDATE {rate_table} r SET tokens = least(r.burst, r.tokens + g.unused)
  FROM given g
 WHERE r.scope = g.scope AND r.name = g.name
   AND (r.scope, r.name) IN (SELECT scope, name FROM locked)

-- name: available
-- A limit's tokens now: what was left, refilled at its rate since, up to its burst.
least(r.burst, r.tokens + r.rate * greatest(0.0, extract(epoch FROM statement_timestamp()
                                                          - r.refilled_at)::float8))

-- name: rate_limits_now
-- `outbox status`: the limits in force (a relay said so within the minute) with their tokens
-- now. A limit is throttled while it holds rows back: it did in the last two seconds, or
-- within the time two of its tokens take, for a limit slower than one a second.
SELECT r.scope, CASE WHEN r.scope = 'tenant' AND r.name = '' THEN '-' ELSE r.name END,
       r.rate, r.burst, {available}, r.held_at,
       coalesce(r.held_at > now() - make_interval(secs => greatest(2.0, 2.0 / r.rate)), false)
  FROM {rate_table} r
 WHERE r.seen_at > now() - interval '1 minute'
 ORDER BY r.scope, r.name

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
-- For the outbox_scheduled_messages gauge, counted up to a million: with more, the count
-- itself took long enough (0.4 s for 1.8 million rows, a parallel scan) to delay promotions.
SELECT count(*) FROM (SELECT 1 FROM {table} WHERE status = 'SCHEDULED' LIMIT 1000000) AS s
