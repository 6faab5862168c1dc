-- outbox-relay schema, version 7: the one DDL source.
--
-- Applying it twice changes nothing. It creates its objects in the first schema of the
-- search_path, so a DBA can install it in a non-public schema with:
--     SET search_path = payments; \i schema.sql
-- (`outbox migrate --schema payments` does the same). Needs PostgreSQL 14 or later.

-- The version this file installs; `outbox migrate` and the relay refuse a mismatch.
CREATE TABLE IF NOT EXISTS local_message_schema (
    version    integer     PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per event. A delivered event costs one INSERT (the application) and one UPDATE (the
-- relay, to CONFIRMED): the relay's ownership of a row is recorded on its bucket, not on the row.
CREATE TABLE IF NOT EXISTS local_message (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Fixed at insert and sent as the `message_id` Kafka header: consumers deduplicate on it.
    message_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    topic           text        NOT NULL,
    -- The Kafka key and the ordering key. NULL: no key, no ordering promise.
    key             bytea,
    -- Exactly the bytes the application gave (UTF-8 JSON when it gave a dict or a list).
    payload         bytea       NOT NULL,
    -- Kafka headers as a JSON array of [name, value] pairs; a value is a JSON string, or
    -- {"base64": "..."} for bytes that are not NUL-free UTF-8, or null.
    headers         jsonb,
    -- Which of the 256 buckets the row belongs to. Buckets are leased to relays; one bucket
    -- holds every row of a key, so one relay at a time delivers a key. The hash is the first
    -- byte of md5(key): any client can compute it. Keyless rows are spread by id.
    bucket          smallint    NOT NULL GENERATED ALWAYS AS (
                        CASE WHEN key IS NULL THEN (id % 256)::smallint
                             ELSE get_byte(decode(md5(key), 'hex'), 0)::smallint END
                    ) STORED,
    -- PENDING: waiting for delivery (possibly in backoff until next_attempt_at).
    -- SENT: claimed by one deliverer until claim_expires_at (the original design's middle
    --       status, kept for it). This relay never writes it: it leases buckets, not rows.
    --       A SENT row holds back its key; `outbox replay --expired-claims` frees it.
    -- CONFIRMED: Kafka acknowledged it (acks=all); kafka_partition/kafka_offset say where.
    -- FAILED: gave up after a permanent error or max attempts; it holds back later rows of
    --         its key until an operator replays or skips it.
    -- SKIPPED: a FAILED (or SCHEDULED) row that an operator chose not to deliver (audited).
    -- SCHEDULED: written with a due time (deliver_at) still ahead; not read by the relay
    --            until the promoter turns it PENDING when due. It holds back no other row.
    status          text        NOT NULL DEFAULT 'PENDING',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    claim_token     uuid,
    claim_expires_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    kafka_partition integer,
    kafka_offset    bigint,
    -- Optional idempotency key from the application: a second event with the same key is
    -- not written (publish() returns the first one's ids).
    dedup_key       text,
    -- Whose event this is, when one outbox serves many tenants; '' for none. The relay's
    -- read is fair across tenants (and, within one, across topics), and per-key order is kept
    -- within each tenant: rows of one key and one tenant are one sequence.
    tenant          text        NOT NULL DEFAULT '',
    -- When a scheduled row falls due (publish(deliver_at=...) or delay=); NULL for the rest.
    -- Kept after the row is promoted to PENDING: a row was held iff deliver_at > created_at.
    deliver_at      timestamptz,
    CONSTRAINT local_message_status_check
        CHECK (status IN ('PENDING', 'SENT', 'CONFIRMED', 'FAILED', 'SKIPPED', 'SCHEDULED')
            -- a SCHEDULED row without a due time would never be promoted
            AND (status <> 'SCHEDULED' OR deliver_at IS NOT NULL)),
    -- Kafka's topic name rules, so that a bad topic is refused at write time by any client.
    -- Every CHECK runs on every INSERT and UPDATE of a row: a length test and a character
    -- class cost a tenth of the equivalent '^[...]{1,249}$' (migration 3).
    CONSTRAINT local_message_topic_check
        CHECK (octet_length(topic) BETWEEN 1 AND 249 AND topic !~ '[^a-zA-Z0-9._-]'
               AND topic NOT IN ('.', '..')),
    CONSTRAINT local_message_attempts_check CHECK (attempts >= 0),
    -- Up to 64 of [a-zA-Z0-9._-], starting with a letter or digit (length tests and character
    -- classes: see the topic's).
    CONSTRAINT local_message_tenant_check
        CHECK (octet_length(tenant) <= 64 AND tenant !~ '[^a-zA-Z0-9._-]' AND tenant !~ '^[._-]')
);

CREATE UNIQUE INDEX IF NOT EXISTS local_message_message_id_key
    ON local_message (message_id);

-- A dedup_key is unique within its tenant: tenants do not share a namespace.
CREATE UNIQUE INDEX IF NOT EXISTS local_message_tenant_dedup_key_key
    ON local_message (tenant, dedup_key) WHERE dedup_key IS NOT NULL;

-- The relay's read of pending rows: which (tenant, topic) groups have rows waiting, and each
-- group's rows in id order (filtered on the relay's buckets). It holds only undelivered rows,
-- so it stays small however large the table grows.
CREATE INDEX IF NOT EXISTS local_message_pending_group_idx
    ON local_message (tenant, topic, id) INCLUDE (bucket) WHERE status = 'PENDING';

-- Rows that block their key (FAILED, SENT) or wait for a retry: all small.
CREATE INDEX IF NOT EXISTS local_message_blocking_idx
    ON local_message (bucket, key, id)
    WHERE status IN ('FAILED', 'SENT') OR (status = 'PENDING' AND next_attempt_at IS NOT NULL);

-- The promoter's: the scheduled rows in due order (the next due time is its first entry).
-- Outside the PENDING index on purpose: rows waiting for next month must not slow the read.
CREATE INDEX IF NOT EXISTS local_message_scheduled_idx
    ON local_message (deliver_at, id) WHERE status = 'SCHEDULED';

-- Retention: created_at grows with id, so a BRIN index finds old rows at almost no write cost.
CREATE INDEX IF NOT EXISTS local_message_created_at_brin
    ON local_message USING brin (created_at);

-- A queue table churns: vacuum it early and without throttling, so that dead tuples left by
-- the UPDATE to CONFIRMED do not slow the relay's read (see docs/operations.md).
ALTER TABLE local_message SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Relays alive. A relay heartbeats its row; one whose lease has expired is dead, and its
-- buckets go to the others.
CREATE TABLE IF NOT EXISTS local_message_relay (
    relay_id     uuid        PRIMARY KEY,
    name         text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz NOT NULL
);

-- Bucket leases: which relay may deliver the rows of a bucket, until when.
CREATE TABLE IF NOT EXISTS local_message_bucket (
    bucket      smallint    PRIMARY KEY CHECK (bucket BETWEEN 0 AND 255),
    owner       uuid,
    lease_until timestamptz
);
INSERT INTO local_message_bucket (bucket)
    SELECT b FROM generate_series(0, 255) AS b
    ON CONFLICT (bucket) DO NOTHING;

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

-- Wake-up hint for idle relays: one NOTIFY per inserting statement (not per row), collapsed by
-- PostgreSQL within a transaction. Polling stays the source of truth. NOTIFY serialises commits
-- on a global lock; to switch it off:
--     ALTER TABLE local_message DISABLE TRIGGER local_message_notify;
CREATE OR REPLACE FUNCTION local_message_notify() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify('outbox_local_message', TG_TABLE_SCHEMA);
    RETURN NULL;
END;
$$;

-- Created only if missing: CREATE OR REPLACE would switch a disabled trigger back on.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'local_message_notify'
                                            AND tgrelid = 'local_message'::regclass) THEN
        CREATE TRIGGER local_message_notify
            AFTER INSERT ON local_message
            FOR EACH STATEMENT EXECUTE FUNCTION local_message_notify();
    END IF;
END
$$;

-- The operators' audit trail: every replay, skip, purge and inbox purge, with who, when and
-- what; a hash chain, so that an edited, deleted or reordered entry shows
-- (`outbox audit verify`, docs/operations.md).
CREATE TABLE IF NOT EXISTS local_message_audit (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The start of the transaction that wrote it (now()).
    at          timestamptz NOT NULL DEFAULT now(),
    -- Who did it: the operating-system user and the database role, as the CLI saw them.
    actor       text        NOT NULL,
    db_user     text        NOT NULL DEFAULT current_user,
    action      text        NOT NULL,
    -- The selection as the operator gave it (filters, ids), and what it touched.
    selection   jsonb       NOT NULL,
    affected    bigint      NOT NULL,
    -- The ids of the rows changed (NULL for purges, which can touch millions).
    ids         bigint[],
    reason      text,
    -- The previous entry's hash (NULL for the first entry) and this entry's: both set by the
    -- trigger local_message_audit_chain, whatever the INSERT gives (migration 5).
    prev_hash   bytea,
    hash        bytea       NOT NULL,
    CONSTRAINT local_message_audit_action_check
        CHECK (action IN ('replay', 'skip', 'purge', 'inbox-purge'))
);

-- The canonical encoding, for the trigger below to write with. `outbox audit verify` never
-- calls it: whoever can edit entries (the owner, a superuser) can also replace this function,
-- so the verifier recomputes the encoding itself (relay/audit.py, entry_hash; a test proves
-- the two agree). Each field is a netstring of its bytes (`<octet length>:<bytes>,`), or `-`
-- when NULL; the fields, in this order: the version tag 'outbox-audit-v1', prev_hash (32 raw
-- bytes), id (decimal), at (microseconds since 1970-01-01 UTC, decimal), actor, db_user,
-- action (UTF-8), selection (its jsonb text), affected (decimal), ids (its array text, such as
-- {7,8,12}: NULL elements and explicit bounds such as [5:6]={1,2} are part of it, so an edit
-- that adds or removes them shows), reason (UTF-8).
CREATE OR REPLACE FUNCTION local_message_audit_hash(
    prev bytea, entry_id bigint, entry_at timestamptz, entry_actor text, entry_db_user text,
    entry_action text, entry_selection jsonb, entry_affected bigint, entry_ids bigint[],
    entry_reason text
) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT sha256(string_agg(
           CASE WHEN f.v IS NULL THEN '\x2d'::bytea
                ELSE convert_to(octet_length(f.v)::text || ':', 'UTF8') || f.v || '\x2c'::bytea
           END, ''::bytea ORDER BY f.n))
  FROM (VALUES (1, convert_to('outbox-audit-v1', 'UTF8')),
               (2, prev),
               (3, convert_to(entry_id::text, 'UTF8')),
               (4, convert_to((extract(epoch FROM entry_at) * 1000000)::bigint::text, 'UTF8')),
               (5, convert_to(entry_actor, 'UTF8')),
               (6, convert_to(entry_db_user, 'UTF8')),
               (7, convert_to(entry_action, 'UTF8')),
               (8, convert_to(entry_selection::text, 'UTF8')),
               (9, convert_to(entry_affected::text, 'UTF8')),
               (10, convert_to(entry_ids::text, 'UTF8')),
               (11, convert_to(entry_reason, 'UTF8'))) AS f(n, v)
$$;

-- Appending: one writer at a time per schema (the statement trigger takes a transaction-level
-- advisory lock before the new row's id is drawn), so ids are handed out in chain order and no
-- two entries can chain to the same predecessor; the row trigger links the entry to the
-- newest one and hashes it. Needs READ COMMITTED, where each query of this function sees what
-- committed before the lock was granted; under a snapshot taken earlier it could miss the
-- newest entry, so it refuses instead.
CREATE OR REPLACE FUNCTION local_message_audit_chain() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    last_id bigint;
BEGIN
    -- The same key as the operator commands' audit_turn (relay/operations.sql).
    PERFORM pg_advisory_xact_lock(2830, hashtext(TG_TABLE_SCHEMA));
    IF TG_LEVEL = 'STATEMENT' THEN
        RETURN NULL;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'audit entries are appended under READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    SELECT id, hash INTO last_id, NEW.prev_hash
      FROM local_message_audit ORDER BY id DESC LIMIT 1;
    IF NEW.id <= last_id THEN
        RAISE EXCEPTION 'audit entry % would follow entry %: ids must grow along the chain',
            NEW.id, last_id;
    END IF;
    NEW.hash := local_message_audit_hash(NEW.prev_hash, NEW.id, NEW.at, NEW.actor,
                                         NEW.db_user, NEW.action, NEW.selection, NEW.affected,
                                         NEW.ids, NEW.reason);
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER local_message_audit_lock
    BEFORE INSERT ON local_message_audit
    FOR EACH STATEMENT EXECUTE FUNCTION local_message_audit_chain();
CREATE OR REPLACE TRIGGER local_message_audit_chain
    BEFORE INSERT ON local_message_audit
    FOR EACH ROW EXECUTE FUNCTION local_message_audit_chain();


-- The consumers' inbox (outbox.inbox): one row per message a consumer group has processed,
-- written in the same transaction as the handler's own writes, so that a redelivered message
-- is recognised and skipped. The key is the pair: each group processes every message once.
CREATE TABLE IF NOT EXISTS inbox_message (
    consumer_group  text        NOT NULL,
    -- The `message_id` Kafka header the relay sends (or an id the consumer derives itself).
    message_id      uuid        NOT NULL,
    -- Where the processed copy was read, for the operator; not part of the key, because a
    -- redelivered copy sits at another offset.
    topic           text,
    kafka_partition integer,
    kafka_offset    bigint,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, message_id)
);

-- Retention (outbox.inbox.purge_inbox) deletes the oldest rows in small batches through it.
CREATE INDEX IF NOT EXISTS inbox_message_processed_at_idx
    ON inbox_message (processed_at);

-- Every version up to this one, so that the table reads the same after a fresh install and
-- after upgrades (outbox/migrations/).
INSERT INTO local_message_schema (version) SELECT generate_series(1, 8)
    ON CONFLICT (version) DO NOTHING;
