-- Named SQL blocks of the operator commands. {where} is the operator's selection.

-- name: list_rows
-- held_by: for a PENDING row held back by its key (the relay's own blocking_keys rule, over
-- every bucket), the id of the row that holds it.
WITH blockers AS MATERIALIZED ({blocking_keys})
SELECT m.*, b.first_id AS held_by
  FROM (SELECT id, message_id, topic, key, status, attempts, next_attempt_at, last_error,
               created_at, delivered_at, kafka_partition, kafka_offset, bucket, dedup_key,
               tenant, deliver_at
          FROM {table}
         WHERE ({where}) AND id > %(after_id)s
         ORDER BY id
         LIMIT %(limit)s) m
  LEFT JOIN blockers b
    ON m.status = 'PENDING' AND b.key = m.key AND b.tenant = m.tenant AND b.first_id < m.id
 ORDER BY m.id

-- name: count_rows
SELECT status, count(*) FROM {table} WHERE {where} GROUP BY status ORDER BY status

-- name: get_row
SELECT id, message_id, topic, key, payload, headers, status, attempts, next_attempt_at,
       last_error, created_at, delivered_at, kafka_partition, kafka_offset, bucket, dedup_key,
       tenant, claim_token, claim_expires_at, deliver_at
  FROM {table}
 WHERE id = %(id)s OR message_id = %(message_id)s

-- name: rows_held_behind
-- Later rows of the same key and tenant that wait for this one (head-of-key blocking).
SELECT count(*) FROM {table}
 WHERE key = %(key)s AND tenant = %(tenant)s AND id > %(id)s AND status = 'PENDING'

-- name: replayable
-- The rows a replay puts back to PENDING: FAILED, SKIPPED and CONFIRMED rows, PENDING rows
-- that were tried (waiting for a retry: sent at once), SENT rows whose claim expired. A PENDING
-- row never tried is on its way already. Named by replay_batch and count_replayable.
(status IN ('FAILED', 'SKIPPED', 'CONFIRMED')
 OR (status = 'PENDING' AND (attempts > 0 OR next_attempt_at IS NOT NULL))
 OR (status = 'SENT' AND claim_expires_at < now()))

-- name: skippable
-- The rows a skip marks SKIPPED: FAILED ones, and SCHEDULED ones (a cancellation, before
-- they fall due) when the operator names that status (`cancel_scheduled`, set by
-- relay.operations from --status SCHEDULED): a `skip --topic payments` meant for failed rows
-- must not cancel the topic's scheduled ones. Locked FOR UPDATE in skip_batch: a row the
-- promoter made PENDING meanwhile is no longer SCHEDULED when the lock is granted, and is
-- left alone (on its way); the promoter skips a row a skip holds.
(status = 'FAILED' OR (status = 'SCHEDULED' AND %(cancel_scheduled)s))

-- name: count_replayable
SELECT count(*) FROM {table} WHERE ({where}) AND {replayable}

-- name: count_skippable
SELECT count(*) FROM {table} WHERE ({where}) AND {skippable}

-- name: replay_batch
-- One batch of a replay: back to PENDING, attempts and backoff cleared, with its audit row in
-- the same transaction. A row whose deliver_at is still ahead (a scheduled row skipped before
-- it fell due) goes back to SCHEDULED: a replay undoes the skip, it does not send early.
WITH picked AS (
    SELECT id FROM {table}
     WHERE ({where}) AND id > %(after_id)s AND {replayable}
     ORDER BY id
     LIMIT %(limit)s
       FOR UPDATE
), changed AS (
    UPDATE {table} m
       SET status = CASE WHEN m.deliver_at > now() THEN 'SCHEDULED' ELSE 'PENDING' END,
           attempts = 0, next_attempt_at = NULL, claim_token = NULL,
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
   AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)

-- name: purge_batch
-- One batch of a purge, with its audit entry in the same transaction. Never PENDING, SENT or
-- SCHEDULED (undelivered):
-- only the statuses the caller passes, which the CLI limits to CONFIRMED and SKIPPED.
WITH gone AS (
    DELETE FROM {table}
     WHERE id IN (SELECT id FROM {table}
                   WHERE status = ANY(%(statuses)s::text[]) AND created_at < %(cutoff)s
                     AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)
                     AND status NOT IN ('PENDING', 'SENT', 'SCHEDULED')
                   ORDER BY id
                   LIMIT %(limit)s
                     FOR UPDATE SKIP LOCKED)
    RETURNING id
), audit AS (
    INSERT INTO {audit_table} (actor, action, selection, affected, reason)
    SELECT %(actor)s, 'purge', %(selection)s::jsonb, count(*), %(reason)s
      FROM gone
    HAVING count(*) > 0
)
SELECT count(*) FROM gone

-- name: audit_turn
-- Taken first in every transaction that changes rows and appends to the audit trail: the
-- trigger local_message_audit_chain takes the same lock (the same key) when the entry is
-- inserted, but a batch's row locks could be taken before that (the DELETE of purge_batch
-- runs before its INSERT), and a replay waiting on such a row while holding this lock would
-- deadlock with it. One order for all: this lock, then rows.
SELECT pg_advisory_xact_lock(2830, hashtext(%(schema)s))

-- name: audit_inbox_purge
-- Written by `outbox inbox purge` inside each batch's transaction (outbox.inbox.purge_inbox's
-- on_batch), so the deleted rows and their entry commit together.
INSERT INTO {audit_table} (actor, action, selection, affected, reason)
VALUES (%(actor)s, 'inbox-purge', %(selection)s::jsonb, %(affected)s, %(reason)s)

-- name: audit_log
-- Newest first; every filter is optional (NULL: not filtered).
SELECT id, at, actor, db_user, action, selection, affected, ids, reason,
       encode(prev_hash, 'hex') AS prev_hash, encode(hash, 'hex') AS hash
  FROM {audit_table}
 WHERE (%(actions)s::text[] IS NULL OR action = ANY(%(actions)s::text[]))
   AND (%(actor)s::text IS NULL OR strpos(lower(actor), lower(%(actor)s::text)) > 0)
   AND (%(since)s::timestamptz IS NULL OR at >= %(since)s::timestamptz)
   AND (%(until)s::timestamptz IS NULL OR at < %(until)s::timestamptz)
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: audit_snapshot
-- The whole walk reads one snapshot, so entries appended meanwhile cannot look out of place.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: audit_chain
-- One page of the chain, oldest first, for `outbox audit verify`: each entry's fields, in the
-- order relay.audit.entry_link takes them. Only read here, never hashed: the verifier
-- recomputes the hashes itself (relay/audit.py), so that a replaced local_message_audit_hash()
-- cannot vouch for an edited entry. selection and ids as their text forms, which is what the
-- encoding hashes.
SELECT id, prev_hash, hash, at, actor, db_user, action, selection::text, affected, ids::text,
       reason
  FROM {audit_table}
 WHERE id > %(after_id)s
 ORDER BY id
 LIMIT %(limit)s

-- name: audit_holders
-- Which entries carry these hashes (to name where a broken link points).
SELECT hash, id FROM {audit_table} WHERE hash = ANY(%(hashes)s::bytea[]) ORDER BY id

-- name: blocked_keys
-- Keys held back by a FAILED row (or a SENT one: the original design's claim, which only
-- `outbox replay --expired-claims` frees), with how many later rows wait behind it. Their
-- held rows are not lag, so these keys are what shows a stall. A key is blocked within its
-- tenant (blocking_keys).
SELECT f.tenant, f.key, f.first_failed, f.failed,
       (SELECT count(*) FROM {table} p
         WHERE p.key = f.key AND p.tenant = f.tenant AND p.status = 'PENDING'
           AND p.id > f.first_failed) AS held
  FROM (SELECT tenant, key, min(id) AS first_failed, count(*) AS failed
          FROM {table} WHERE status IN ('FAILED', 'SENT') AND key IS NOT NULL
         GROUP BY tenant, key) f
 ORDER BY f.first_failed
 LIMIT %(limit)s

-- name: blocked_key_count
SELECT count(*) FROM (SELECT DISTINCT tenant, key FROM {table}
                        WHERE status IN ('FAILED', 'SENT') AND key IS NOT NULL) AS blocked
