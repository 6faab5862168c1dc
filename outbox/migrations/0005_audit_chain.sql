-- Migration 5: the audit trail becomes a hash chain, and records `outbox inbox purge` too.
--
-- Every entry stores the previous entry's hash and its own: sha256 over a canonical encoding
-- of the previous hash and its columns (local_message_audit_hash, docs/operations.md). The
-- entries already there are chained here, in id order, so an upgraded trail verifies. The
-- audit table is locked while this runs; it holds one row per operator batch, so it is quick.

ALTER TABLE local_message_audit ADD COLUMN IF NOT EXISTS prev_hash bytea;
ALTER TABLE local_message_audit ADD COLUMN IF NOT EXISTS hash bytea;

ALTER TABLE local_message_audit DROP CONSTRAINT IF EXISTS local_message_audit_action_check;
ALTER TABLE local_message_audit ADD CONSTRAINT local_message_audit_action_check
    CHECK (action IN ('replay', 'skip', 'purge', 'inbox-purge'));

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

-- Chain the entries written before this version, oldest first.
DO $$
DECLARE
    entry record;
    previous bytea;
BEGIN
    FOR entry IN SELECT * FROM local_message_audit ORDER BY id LOOP
        UPDATE local_message_audit
           SET prev_hash = previous,
               hash = local_message_audit_hash(previous, entry.id, entry.at, entry.actor,
                                               entry.db_user, entry.action, entry.selection,
                                               entry.affected, entry.ids, entry.reason)
         WHERE id = entry.id
        RETURNING hash INTO previous;
    END LOOP;
END
$$;

ALTER TABLE local_message_audit ALTER COLUMN hash SET NOT NULL;

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

INSERT INTO local_message_schema (version) VALUES (5) ON CONFLICT (version) DO NOTHING;
