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

INSERT INTO local_message_schema (version) VALUES (8) ON CONFLICT (version) DO NOTHING;
