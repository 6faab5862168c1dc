-- Named SQL blocks of `outbox reconcile`. The window's rows are read in pages, each page its
-- own short statement (the connection is in autocommit): no snapshot is held while Kafka is
-- read (a transaction open for minutes would keep vacuum from cleaning the table), nothing is
-- materialised or sorted on the server, and the client holds a page at a time. {where} is the
-- operator's --topic / --key filter.

-- name: in_window
-- The rows to check: CONFIRMED and delivered in the window. There is no index on delivered_at
-- (the relay's confirm sets it: an index would make every confirm a non-HOT update), so this
-- is a filter on the rows that a page's range of ids reads.
status = 'CONFIRMED' AND ({where})
AND (%(since)s::timestamptz IS NULL OR delivered_at >= %(since)s::timestamptz)
AND (%(until)s::timestamptz IS NULL OR delivered_at < %(until)s::timestamptz)

-- name: id_range
-- The ids a whole window can hold: two probes of the primary key. Rows inserted after this
-- have larger ids and were delivered after the reconciliation started.
SELECT min(id), max(id) FROM {table}

-- name: page_after
-- The next page of the window, in id order along the primary key: the rows after id
-- %(after)s up to id %(last)s (the caller keeps that span bounded, so that a page of a sparse
-- window, a few rows of a long table, ends soon too). The payload is compared by its SHA-256,
-- computed here: 32 bytes a row cross the wire, not the payload; the message_id as text, the
-- form of the Kafka header. The session runs with enable_sort off: a window that looks
-- selective (a recent --since) must not be planned as a sequential scan of the whole table
-- and a sort, for every page.
SELECT id, message_id::text, topic, kafka_partition, kafka_offset, key, sha256(payload)
  FROM {table}
 WHERE id > %(after)s AND id <= %(last)s AND ({in_window})
 ORDER BY id
 LIMIT %(page)s

-- name: page_of_ids
-- The rows of a page of picked ids (--sample, --limit), if they are still in the window.
SELECT id, message_id::text, topic, kafka_partition, kafka_offset, key, sha256(payload)
  FROM {table}
 WHERE id = ANY(%(ids)s::bigint[]) AND ({in_window})

-- name: pick_sample
-- A random N rows of the window: one scan, and a sort of N (id, random) pairs at most.
SELECT id FROM (SELECT id FROM {table} WHERE {in_window} ORDER BY random() LIMIT %(count)s) AS p
 ORDER BY id

-- name: pick_latest
-- The N rows delivered last.
SELECT id FROM (SELECT id FROM {table} WHERE {in_window}
                 ORDER BY delivered_at DESC, id DESC LIMIT %(count)s) AS p
 ORDER BY id
