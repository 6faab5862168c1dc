-- Migration 2: the operators' audit trail (replay, skip, purge), readable back by an auditor.

CREATE TABLE IF NOT EXISTS local_message_audit (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    -- Who did it: the operating-system user and the database role, as the CLI saw them.
    actor       text        NOT NULL,
    db_user     text        NOT NULL DEFAULT current_user,
    action      text        NOT NULL CHECK (action IN ('replay', 'skip', 'purge')),
    -- The selection as the operator gave it (filters, ids), and what it touched.
    selection   jsonb       NOT NULL,
    affected    bigint      NOT NULL,
    -- The ids of the rows changed (NULL for purge, which can touch millions).
    ids         bigint[],
    reason      text
);

INSERT INTO local_message_schema (version) VALUES (2) ON CONFLICT (version) DO NOTHING;
