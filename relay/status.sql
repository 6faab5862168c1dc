-- Named SQL blocks of `outbox status`.

-- name: counts_by_topic
-- By tenant, topic and status, with the rows delivered in the last `window` seconds: the
-- delivery rate, from the same scan.
SELECT tenant, topic, status, count(*),
       count(*) FILTER (WHERE delivered_at > now() - make_interval(secs => %(window)s))
  FROM {table}
 GROUP BY tenant, topic, status
 ORDER BY tenant, topic, status

-- name: relays
SELECT r.relay_id, r.name, r.heartbeat_at,
       (SELECT count(*) FROM {bucket_table} b
         WHERE b.owner = r.relay_id AND b.lease_until > now()) AS buckets
  FROM {relay_table} r
 WHERE r.lease_until > now()
 ORDER BY r.name

-- name: schema_version
SELECT max(version) FROM {schema_table}

-- name: in_backoff
SELECT count(*) FROM {table}
 WHERE status = 'PENDING' AND next_attempt_at IS NOT NULL AND next_attempt_at > now()

-- name: rate_limits
-- The relays' rate limits with their tokens now (relay.rate_limits). A limit is throttled
-- while it holds rows back: it did in the last two seconds, or within the time two of its
-- tokens take, for a limit slower than one a second (the relay reads again when the next
-- token is due, and notes each read that held rows back).
SELECT scope, CASE WHEN scope = 'tenant' AND name = '' THEN '-' ELSE name END AS name,
       rate, burst,
       least(burst, tokens + rate * greatest(0.0, extract(epoch FROM now() - refilled_at)::float8))
           AS tokens,
       held_at,
       coalesce(held_at > now() - make_interval(secs => greatest(2.0, 2.0 / rate)), false)
           AS throttled
  FROM {rate_table}
 ORDER BY scope, name

-- name: scheduled
-- SCHEDULED rows: how many, and when the next falls due (the first entry of the scheduled
-- index); its seconds from now are negative when it is overdue (no relay promoting).
SELECT count(*), min(deliver_at),
       extract(epoch FROM min(deliver_at) - now())::double precision
  FROM {table}
 WHERE status = 'SCHEDULED'
