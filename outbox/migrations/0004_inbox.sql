-- Migration 4: the consumers' inbox (outbox.inbox). A new, empty table: it takes no lock on
-- local_message and runs in an instant whatever the outbox holds.

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

INSERT INTO local_message_schema (version) VALUES (4) ON CONFLICT (version) DO NOTHING;
