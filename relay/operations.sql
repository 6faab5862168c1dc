-- Named SQL blocks of the operator commands. {where} is the operator's selection.

-- name: list_rows
-- held_by: for a PENDING row held back by its key (the relay's own blocking_keys rule, over
-- every bucket), the id of the row that holds it.
WITH blockers AS ({blocking_keys})
SELECT m.*,
       (SELECT b.first_id FROM blockers b
         WHERE m.status = 'PENDING' AND b.key = m.key AND b.first_id < m.id) AS held_by
  FROM (SELECT id, message_id, topic, key, status, attempts, next_attempt_at, last_error,
               created_at, delivered_at, kafka_partition, kafka_offset, bucket, dedup_key
          FROM {table}
         WHERE ({where}) AND id > %(after_id)s
         ORDER BY id
         LIMIT %(limit)s) m
 ORDER BY m.id

-- name: count_rows
SELECT status, count(*) FROM {table} WHERE {where} GROUP BY status ORDER BY status

-- name: get_row
SELECT id, message_id, topic, key, payload, headers, status, attempts, next_attempt_at,
       last_error, created_at, delivered_at, kafka_partition, kafka_offset, bucket, dedup_key,
       claim_token, claim_expires_at
  FROM {table}
 WHERE id = %(id)s OR message_id = %(message_id)s

-- name: rows_held_behind
-- Later rows of the same key that wait for this one (head-of-key blocking).
SELECT count(*) FROM {table}
 WHERE key = %(key)s AND id > %(id)s AND status = 'PENDING'

-- name: replayable
-- The rows a replay puts back to PENDING: FAILED, SKIPPED and CONFIRMED rows, PENDING rows
-- that were tried (waiting for a retry: sent at once), SENT rows whose claim expired. A PENDING
-- row never tried is on its way already. Named by replay_batch and count_replayable.
(status IN ('FAILED', 'SKIPPED', 'CONFIRMED')
 OR (status = 'PENDING' AND (attempts > 0 OR next_attempt_at IS NOT NULL))
 OR (status = 'SENT' AND claim_expires_at < now()))

-- name: skippable
-- The rows a skip marks SKIPPED: FAILED ones only.
(status = 'FAILED')

-- name: count_replayable
SELECT count(*) FROM {table} WHERE ({where}) AND {replayable}

-- name: count_skippable
SELECT count(*) FROM {table} WHERE ({where}) AND {skippable}

-- name: replay_batch
-- One batch of a replay: back to PENDING, attempts and backoff cleared, with its audit row in
-- the same transaction.
WITH picked AS (
    SELECT id FROM {table}
     WHERE ({where}) AND id > %(after_id)s AND {replayable}
     ORDER BY id
     LIMIT %(limit)s
       FOR UPDATE
), changed AS (
    UPDATE {table} m
       SET status = 'PENDING', attempts = 0, next_attempt_at = NULL, claim_token = NULL,
           claim_expires_at = NULL, delivered_at = NULL, kafka_partition = NULL,
           kafka_offset = NULL
      FROM picked
     WHERE m.id = picked.id
    RETURNING m.id
), audit AS (
    INSERT INTO {audit_table} (actor, action, selection, affected, ids, reason)
    SELECT %(actor)s, 'replay', %(selection)s::jsonb, count(*), array_agg(id ORDER BY id),
           %(reason)s
      FROM changed
    HAVING count(*) > 0
    RETURNING ids
)
SELECT coalesce((SELECT ids FROM audit), ARRAY[]::bigint[])

-- name: skip_batch
WITH picked AS (
    SELECT id FROM {table}
     WHERE ({where}) AND id > %(after_id)s AND {skippable}
     ORDER BY id
     LIMIT %(limit)s
       FOR UPDATE
), changed AS (
    UPDATE {table} m SET status = 'SKIPPED', next_attempt_at = NULL
      FROM picked
     WHERE m.id = picked.id
    RETURNING m.id
), audit AS (
    INSERT INTO {audit_table} (actor, action, selection, affected, ids, reason)
    SELECT %(actor)s, 'skip', %(selection)s::jsonb, count(*), array_agg(id ORDER BY id),
           %(reason)s
      FROM changed
    HAVING count(*) > 0
    RETURNING ids
)
SELECT coalesce((SELECT ids FROM audit), ARRAY[]::bigint[])

-- name: purge_count
SELECT count(*) FROM {table}
 WHERE status = ANY(%(statuses)s::text[]) AND created_at < %(cutoff)s

-- name: purge_batch
-- Never PENDING or SENT: only the statuses the caller passes, which the CLI limits to
-- CONFIRMED and SKIPPED.
DELETE FROM {table}
 WHERE id IN (SELECT id FROM {table}
               WHERE status = ANY(%(statuses)s::text[]) AND created_at < %(cutoff)s
                 AND status NOT IN ('PENDING', 'SENT')
               ORDER BY id
               LIMIT %(limit)s
                 FOR UPDATE SKIP LOCKED)

-- name: audit_purge
INSERT INTO {audit_table} (actor, action, selection, affected, reason)
VALUES (%(actor)s, 'purge', %(selection)s::jsonb, %(affected)s, %(reason)s)

-- name: audit_log
SELECT id, at, actor, db_user, action, selection, affected, ids, reason
  FROM {audit_table}
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: blocked_keys
-- Keys held back by a FAILED row, with how many later rows wait behind it.
SELECT f.key, f.first_failed, f.failed,
       (SELECT count(*) FROM {table} p
         WHERE p.key = f.key AND p.status = 'PENDING' AND p.id > f.first_failed) AS held
  FROM (SELECT key, min(id) AS first_failed, count(*) AS failed
          FROM {table} WHERE status = 'FAILED' AND key IS NOT NULL GROUP BY key) f
 ORDER BY f.first_failed
 LIMIT %(limit)s

-- name: blocked_key_count
SELECT count(DISTINCT key) FROM {table} WHERE status = 'FAILED' AND key IS NOT NULL
