-- Named SQL blocks of the consumers' inbox (outbox/inbox.py), loaded once by outbox.sql.
-- `{inbox_table}` is the schema-qualified inbox_message table, quoted by psycopg.sql.

-- name: record_message
-- A row already there (the group processed the message before) makes ON CONFLICT skip the
-- insert, and RETURNING gives nothing. Two transactions recording the same pair at once: under
-- READ COMMITTED the second waits on the primary key until the first ends; if the first
-- commits, the second sees the conflict and gets nothing (its handler does not run), and if
-- the first rolls back, the second inserts. Under REPEATABLE READ or SERIALIZABLE the second
-- fails with a serialization error instead, and its caller retries. Either way the handler's
-- writes commit once.
INSERT INTO {inbox_table} (consumer_group, message_id, topic, kafka_partition, kafka_offset)
VALUES (%(group)s, %(message_id)s, %(topic)s, %(partition)s, %(offset)s)
    ON CONFLICT (consumer_group, message_id) DO NOTHING
RETURNING 1

-- name: purge_cutoff
-- The database's clock, not the caller's, decides what is old: processed_at is its now().
SELECT now() - %(older_than)s::interval

-- name: purge_count
SELECT count(*) FROM {inbox_table}
 WHERE processed_at < now() - %(older_than)s::interval
   AND (consumer_group = %(group)s OR %(group)s IS NULL)

-- name: purge_turn
-- Purges take turns, one batch at a time (every consumer of a group may run retention, and an
-- operator the command at the same moment): two DELETEs of overlapping rows could lock them in
-- different orders and deadlock. Not SELECT ... FOR UPDATE SKIP LOCKED, which would need the
-- UPDATE privilege a consumer has no other use for. Held until the batch's transaction ends.
SELECT pg_advisory_xact_lock(2829, 0)

-- name: purge_batch
-- The oldest rows first, through the processed_at index.
DELETE FROM {inbox_table}
 WHERE (consumer_group, message_id) IN (
       SELECT consumer_group, message_id FROM {inbox_table}
        WHERE processed_at < %(cutoff)s
        ORDER BY processed_at
        LIMIT %(limit)s)

-- name: purge_group_batch
-- purge_batch for one consumer group. A block of its own rather than `group IS NULL OR ...`,
-- which a prepared statement's generic plan could not use an index for.
DELETE FROM {inbox_table}
 WHERE (consumer_group, message_id) IN (
       SELECT consumer_group, message_id FROM {inbox_table}
        WHERE processed_at < %(cutoff)s AND consumer_group = %(group)s
        ORDER BY processed_at
        LIMIT %(limit)s)
