-- Migration 8: rate limits per tenant and per topic, shared by every relay.
--
-- local_message_tenant lists the tenants known to the relays (filled here from the rows
-- already written: one read of the table, with writers waiting, like any migration that reads
-- a large table; docs/operations.md, "Upgrading"). local_message_rate holds the limits' token
-- buckets.

-- Tenants known to the relays: every tenant whose rows a relay has read (it registers each
-- new one it meets). A relay refuses a rate limit for a tenant neither listed here nor with
-- rows waiting, which a misspelt name would otherwise leave unlimited. An operator may list a
-- tenant before its first event:
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
    -- Tokens left at refilled_at; last_taken: the last grant.
    tokens      double precision NOT NULL,
    refilled_at timestamptz      NOT NULL DEFAULT now(),
    last_taken  double precision NOT NULL DEFAULT 0,
    -- The last time the limit held rows back (NULL: never); the last time a relay said it
    -- has the limit (each heartbeat): a limit no relay has had for a minute is forgotten.
    held_at     timestamptz,
    seen_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, name)
);

INSERT INTO local_message_tenant (tenant)
    SELECT DISTINCT tenant FROM local_message WHERE tenant <> ''
    ON CONFLICT (tenant) DO NOTHING;

-- The roles already at work keep working: a writer's INSERT names the tenant column in its
-- ON CONFLICT target since migration 6, which takes SELECT on it (a least-privilege writer
-- granted before it lacked that, and every INSERT failed); every role that reads the whole
-- table (relays, operators: `outbox status` reads the limits) may read the new tables; every
-- relay (it updates the bucket leases) registers tenants and keeps the limits' buckets.
-- Column-level grants count (has_any_column_privilege); superusers and the owner need none.
DO $$
DECLARE
    role_row record;
BEGIN
    FOR role_row IN
        SELECT quote_ident(r.rolname) AS who,
               has_any_column_privilege(r.oid, 'local_message'::regclass, 'INSERT') AS writes,
               has_table_privilege(r.oid, 'local_message'::regclass, 'SELECT') AS reads,
               has_table_privilege(r.oid, 'local_message_bucket'::regclass, 'UPDATE') AS leases
          FROM pg_roles r
         WHERE NOT r.rolsuper AND r.rolname !~ '^pg_'
           AND r.oid <> (SELECT relowner FROM pg_class WHERE oid = 'local_message'::regclass)
    LOOP
        IF role_row.writes THEN
            EXECUTE format('GRANT SELECT (tenant) ON local_message TO %s', role_row.who);
        END IF;
        IF role_row.reads THEN
            EXECUTE format('GRANT SELECT ON local_message_tenant, local_message_rate TO %s',
                           role_row.who);
        END IF;
        IF role_row.leases THEN
            EXECUTE format('GRANT SELECT, INSERT ON local_message_tenant TO %s', role_row.who);
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON local_message_rate TO %s',
                           role_row.who);
        END IF;
    END LOOP;
END
$$;

INSERT INTO local_message_schema (version) VALUES (8) ON CONFLICT (version) DO NOTHING;
