-- Migration 8: rate limits per tenant and per topic, shared by every relay.
--
-- local_message_tenant lists the tenants that have written events (filled here from the rows
-- already written: one read of the table, with writers waiting, like any migration that reads
-- a large table; docs/operations.md, "Upgrading"). local_message_rate holds the limits' token
-- buckets.

-- Tenants that have written an event (the writer registers each in the statement that writes
-- its rows): the relay refuses a rate limit for a tenant not listed here, which a misspelt
-- name would otherwise leave unlimited. An operator may list a tenant before its first event:
--     INSERT INTO local_message_tenant (tenant) VALUES ('new-tenant');
CREATE TABLE IF NOT EXISTS local_message_tenant (
    tenant     text        PRIMARY KEY
               CHECK (tenant <> '' AND octet_length(tenant) <= 64
                      AND tenant !~ '[^a-zA-Z0-9._-]' AND tenant !~ '^[._-]'),
    first_seen timestamptz NOT NULL DEFAULT now()
);

-- Rate limits' token buckets, one row per limit in force (relay/rate_limits.py): every relay
-- of the outbox draws on the same row, so a limit holds for all of them together. Written by
-- the relays only; `outbox status` reads it.
CREATE TABLE IF NOT EXISTS local_message_rate (
    scope       text             NOT NULL CHECK (scope IN ('tenant', 'topic')),
    -- The tenant ('' for rows without one) or the topic.
    name        text             NOT NULL,
    -- Messages a second, and the most tokens kept (as the relays are configured).
    rate        double precision NOT NULL CHECK (rate > 0),
    burst       double precision NOT NULL CHECK (burst >= 1),
    -- Tokens left at refilled_at; last_taken: the last read's grant.
    tokens      double precision NOT NULL,
    refilled_at timestamptz      NOT NULL DEFAULT now(),
    last_taken  double precision NOT NULL DEFAULT 0,
    -- The last time the limit held rows back (NULL: never).
    held_at     timestamptz,
    PRIMARY KEY (scope, name)
);

INSERT INTO local_message_tenant (tenant)
    SELECT DISTINCT tenant FROM local_message WHERE tenant <> ''
    ON CONFLICT (tenant) DO NOTHING;

-- The roles already at work keep working: a writer's INSERT now registers its tenant (and
-- names the tenant column in its ON CONFLICT target, since migration 6), so every role that
-- may insert events gets what that takes; every role that reads the whole table (relays,
-- operators: `outbox status` reads the limits) may read the new tables; every relay (it
-- updates the bucket leases) may keep the limits' buckets. Without this, a least-privilege
-- writer's every INSERT failed after the upgrade until `outbox grants` was applied again.
DO $$
DECLARE
    grant_row record;
BEGIN
    FOR grant_row IN
        SELECT DISTINCT p.grantee, p.table_name, p.privilege_type
          FROM information_schema.table_privileges p
         WHERE p.table_schema = current_schema()
           AND (p.table_name, p.privilege_type) IN (('local_message', 'INSERT'),
                                                    ('local_message', 'SELECT'),
                                                    ('local_message_bucket', 'UPDATE'))
           AND p.grantee <> (SELECT r.rolname FROM pg_roles r
                              JOIN pg_class c ON c.relowner = r.oid
                             WHERE c.oid = 'local_message'::regclass)
    LOOP
        EXECUTE format(
            CASE
                WHEN grant_row.privilege_type = 'INSERT' THEN
                    'GRANT SELECT (tenant) ON local_message TO %1$s; '
                    'GRANT SELECT (tenant), INSERT ON local_message_tenant TO %1$s'
                WHEN grant_row.table_name = 'local_message' THEN
                    'GRANT SELECT ON local_message_tenant, local_message_rate TO %1$s'
                ELSE 'GRANT SELECT, INSERT, UPDATE, DELETE ON local_message_rate TO %1$s'
            END,
            CASE WHEN grant_row.grantee = 'PUBLIC' THEN 'PUBLIC'
                 ELSE quote_ident(grant_row.grantee) END);
    END LOOP;
END
$$;

INSERT INTO local_message_schema (version) VALUES (8) ON CONFLICT (version) DO NOTHING;
