-- Migration 6: tenants, and a read that is fair across them.
--
-- `tenant` is added with a constant default: PostgreSQL records the default in the catalog
-- and rewrites no row, so every existing row is the no-tenant '' at once.
--
-- The dedup_key's unique index becomes (tenant, dedup_key). The PENDING index becomes
-- (tenant, topic, id): the relay finds the groups with rows waiting
-- by skipping along it, and reads each group's rows in id order (relay/queries.sql,
-- fetch_pending). Building it reads the whole table once, with writers and the relay waiting
-- (`outbox migrate` runs a migration in one transaction): plan it like any index build on a
-- large table (docs/operations.md, "Upgrading"). The new index is built before the old one is
-- dropped, so the relay's read is never without one.

ALTER TABLE local_message ADD COLUMN IF NOT EXISTS tenant text NOT NULL DEFAULT '';

ALTER TABLE local_message DROP CONSTRAINT IF EXISTS local_message_tenant_check;
ALTER TABLE local_message ADD CONSTRAINT local_message_tenant_check
    CHECK (octet_length(tenant) <= 64 AND tenant !~ '[^a-zA-Z0-9._-]' AND tenant !~ '^[._-]');

CREATE INDEX IF NOT EXISTS local_message_pending_group_idx
    ON local_message (tenant, topic, id) INCLUDE (bucket) WHERE status = 'PENDING';
DROP INDEX IF EXISTS local_message_pending_idx;

-- A dedup_key is unique within its tenant (every existing row is the no-tenant '', so the
-- rows that were unique stay unique).
CREATE UNIQUE INDEX IF NOT EXISTS local_message_tenant_dedup_key_key
    ON local_message (tenant, dedup_key) WHERE dedup_key IS NOT NULL;
DROP INDEX IF EXISTS local_message_dedup_key_key;

INSERT INTO local_message_schema (version) VALUES (6) ON CONFLICT (version) DO NOTHING;
