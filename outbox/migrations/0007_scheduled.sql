-- Migration 7: scheduled delivery (`publish(..., deliver_at=...)` or `delay=`).
--
-- `deliver_at` is when a scheduled row falls due; it is kept after the row is promoted, for
-- `outbox show` and for whoever checks the order later (a row was held iff deliver_at >
-- created_at). Added without a default: PostgreSQL records the NULL of every existing row in
-- the catalog and rewrites none.
--
-- A row waiting for its time is SCHEDULED, not PENDING: the relay's read walks the PENDING
-- index group by group and blocking_keys groups the held keys (relay/queries.sql), and a
-- million reminders for next month there would slow every read. SCHEDULED rows sit outside
-- both indexes; the promoter (relay/promoter.py) turns the due ones PENDING, finding them
-- through the small index below, which holds only the rows still waiting.
--
-- The status check is replaced in one transaction (`outbox migrate` runs a migration in
-- one): the new check validates every row once, with writers waiting meanwhile.

ALTER TABLE local_message ADD COLUMN IF NOT EXISTS deliver_at timestamptz;

ALTER TABLE local_message DROP CONSTRAINT IF EXISTS local_message_status_check;
ALTER TABLE local_message ADD CONSTRAINT local_message_status_check
    CHECK (status IN ('PENDING', 'SENT', 'CONFIRMED', 'FAILED', 'SKIPPED', 'SCHEDULED')
        -- a SCHEDULED row without a due time would never be promoted
        AND (status <> 'SCHEDULED' OR deliver_at IS NOT NULL));

CREATE INDEX IF NOT EXISTS local_message_scheduled_idx
    ON local_message (deliver_at, id) WHERE status = 'SCHEDULED';

INSERT INTO local_message_schema (version) VALUES (7) ON CONFLICT (version) DO NOTHING;
