-- Migration 3: the same topic rule, checked at a fraction of the cost.
--
-- PostgreSQL checks every CHECK constraint of a row on each INSERT and on each UPDATE, even one
-- that does not touch the column. The regular expression '^[a-zA-Z0-9._-]{1,249}$' compiles to
-- an automaton with one state per repetition; running it cost about 35 us per row, more than
-- the rest of the relay's UPDATE to CONFIRMED (docs/benchmarks.md, "The writer's side").
-- A length test and a character-class test accept exactly the same topics.
--
-- `outbox migrate` runs a migration in one transaction, so the table stays locked (writers and
-- the relay wait) while every row is checked: about 2 s per million rows on the bench machine
-- (9.7 s for 5,200,000). Plan it like any constraint change on a large table
-- (docs/operations.md, "Upgrading").

ALTER TABLE local_message DROP CONSTRAINT IF EXISTS local_message_topic_check;
ALTER TABLE local_message ADD CONSTRAINT local_message_topic_check
    CHECK (octet_length(topic) BETWEEN 1 AND 249 AND topic !~ '[^a-zA-Z0-9._-]'
           AND topic NOT IN ('.', '..'));

INSERT INTO local_message_schema (version) VALUES (3) ON CONFLICT (version) DO NOTHING;
