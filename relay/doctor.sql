-- Named SQL blocks of `outbox doctor`. Catalog queries take the schema's name as a parameter,
-- queries of the outbox's own tables their qualified names.

-- name: server_version
SHOW server_version

-- name: indexes
SELECT indexname FROM pg_indexes WHERE schemaname = %(schema)s AND tablename = 'local_message'

-- name: table_options
SELECT coalesce(c.reloptions, '{{}}')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = 'local_message'

-- name: old_transactions
-- Transactions open long enough to hold back vacuum (and so the relay's read), oldest first.
SELECT pid, usename, state, extract(epoch FROM now() - xact_start)::int, left(query, 80)
  FROM pg_stat_activity
 WHERE xact_start < now() - make_interval(secs => %(seconds)s) AND pid <> pg_backend_pid()
 ORDER BY xact_start
 LIMIT 5

-- name: inactive_slots
SELECT slot_name, active FROM pg_replication_slots WHERE NOT active

-- name: dead_rows
SELECT coalesce(n_live_tup, 0), coalesce(n_dead_tup, 0)
  FROM pg_stat_user_tables
 WHERE schemaname = %(schema)s AND relname = 'local_message'

-- name: counts_by_status
SELECT status, count(*) FROM {table} GROUP BY status

-- name: relays_alive
SELECT count(*) FROM {relay_table} WHERE lease_until > now()
