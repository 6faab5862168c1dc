-- Named SQL blocks of `outbox reconcile`. {where} is the operator's --topic / --key filter,
-- {pick} one of the pick_* blocks below (or nothing: every row of the window).

-- name: open_rows
-- The CONFIRMED rows of the window, in Kafka's order (topic, partition, offset), so that the
-- checker reads each partition once, forward. WITH HOLD: the result is materialised on the
-- server when the statement's own transaction commits, so no snapshot is held while Kafka is
-- read (a transaction open for minutes would keep vacuum from cleaning the table), and the
-- client fetches it in pages (bounded memory). The payload is compared by its SHA-256,
-- computed here: 32 bytes a row cross the wire and the sort, not the payload; the message_id
-- as text, the form of the Kafka header. Rows without a
-- recorded place sort last (NULLS LAST is the default of ascending order).
DECLARE {cursor} SCROLL CURSOR WITH HOLD FOR
SELECT id, message_id::text, topic, kafka_partition, kafka_offset, key, sha256(payload)
  FROM (SELECT id, message_id, topic, kafka_partition, kafka_offset, key, payload
          FROM {table}
         WHERE status = 'CONFIRMED' AND ({where})
           AND (%(since)s::timestamptz IS NULL OR delivered_at >= %(since)s::timestamptz)
           AND (%(until)s::timestamptz IS NULL OR delivered_at < %(until)s::timestamptz)
         {pick}
       ) AS picked
 ORDER BY topic, kafka_partition, kafka_offset, id

-- name: pick_sample
ORDER BY random() LIMIT %(count)s

-- name: pick_latest
ORDER BY delivered_at DESC, id DESC LIMIT %(count)s

-- name: count_rows
-- How many rows the cursor holds (for the progress bar), then back to its start.
MOVE FORWARD ALL IN {cursor}

-- name: rewind
MOVE ABSOLUTE 0 IN {cursor}

-- name: fetch_rows
FETCH FORWARD {count} FROM {cursor}

-- name: close_rows
CLOSE {cursor}
