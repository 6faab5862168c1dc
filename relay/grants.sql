-- The least privileges of each role, printed by `outbox grants`. {schema} and {role} are
-- quoted identifiers. tests/integration/test_least_privilege.py runs the relay and the writer
-- with exactly these grants and nothing more.

-- name: relay
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON {schema}.local_message_schema TO {role};
-- Read pending rows; write only the delivery columns.
GRANT SELECT ON {schema}.local_message TO {role};
GRANT UPDATE (status, attempts, next_attempt_at, last_error, delivered_at, kafka_partition,
              kafka_offset) ON {schema}.local_message TO {role};
-- Leases: its own heartbeat row and the bucket owners.
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.local_message_relay TO {role};
GRANT SELECT, UPDATE ON {schema}.local_message_bucket TO {role};
-- Rate limits: the tenants known (it registers those it meets), the limits' token buckets.
GRANT SELECT, INSERT ON {schema}.local_message_tenant TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.local_message_rate TO {role};

-- name: relay_retention
-- Only with --retention: the relay deletes old CONFIRMED rows.
GRANT DELETE ON {schema}.local_message TO {role};

-- name: writer
-- The application's role: insert events, and read back the ids of a repeated dedup_key (which
-- is unique within its tenant).
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT (id, message_id, dedup_key, tenant), INSERT ON {schema}.local_message TO {role};

-- name: operator
-- `outbox status`, list, show, replay, skip, purge, audit, inbox purge (not migrate, which owns
-- the tables).
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};
GRANT UPDATE (status, attempts, next_attempt_at, claim_token, claim_expires_at, delivered_at,
              kafka_partition, kafka_offset) ON {schema}.local_message TO {role};
GRANT DELETE ON {schema}.local_message TO {role};
-- Append to the audit trail, naming only what the operator says: `at`, `db_user` and the
-- hash chain are the database's to set (defaults and the chain trigger), so an operator cannot
-- backdate an entry or sign it as another role. No UPDATE or DELETE.
GRANT INSERT (actor, action, selection, affected, ids, reason)
    ON {schema}.local_message_audit TO {role};
-- `outbox inbox purge` (from cron, say): the consumers' old inbox rows.
GRANT DELETE ON {schema}.inbox_message TO {role};

-- name: consumer
-- A consumer with the inbox (outbox.inbox, InboxConsumer): record what it processed (INSERT
-- ... ON CONFLICT needs SELECT too) and delete its old rows (purge_inbox, retention). Its
-- handler's own tables are the application's to grant.
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, INSERT, DELETE ON {schema}.inbox_message TO {role};
