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

-- name: scheduled
-- SCHEDULED rows: how many, and when the next falls due (the first entry of the scheduled
-- index); its seconds from now are negative when it is overdue (no relay promoting).
SELECT count(*), min(deliver_at),
       extract(epoch FROM min(deliver_at) - now())::double precision
  FROM {table}
 WHERE status = 'SCHEDULED'
