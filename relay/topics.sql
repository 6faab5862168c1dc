-- Named SQL blocks of `outbox topics`.

-- name: undelivered_topics
-- The topics of every row the relay may still deliver, with how many rows name each: PENDING
-- (sent when its turn comes), FAILED (sent again by `outbox replay`) and SENT (freed by
-- `outbox replay --expired-claims`), SCHEDULED (sent when it falls due: its topic should
-- exist by then). Three branches, one per partial index (local_message_pending_group_idx,
-- local_message_blocking_idx, local_message_scheduled_idx), so that none walks the delivered
-- rows, however many there are.
SELECT topic, sum(n)::bigint AS rows
  FROM (SELECT topic, count(*) AS n FROM {table} WHERE status = 'PENDING' GROUP BY topic
        UNION ALL
        SELECT topic, count(*) FROM {table} WHERE status IN ('FAILED', 'SENT') GROUP BY topic
        UNION ALL
        SELECT topic, count(*) FROM {table} WHERE status = 'SCHEDULED' GROUP BY topic) t
 GROUP BY topic
 ORDER BY topic
