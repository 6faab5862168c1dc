"""The ours-id-order peer: our relay, unchanged but for its read, which is the one before the fair
read (schema version 5): every PENDING row of the relay's buckets in id order, along a PENDING
index on (id). It is the baseline of the fair read's cost on a single-tenant drain
(bench/run.py, docs/benchmarks.md); its database gets that index instead of the (tenant,
topic, id) one (run.py, use_id_order_index).

    python bench/id_order_relay.py relay --name ... (the `outbox relay` command's arguments)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from outbox.sql import compose
from relay.cli import main
from relay.store import PostgresStore

#: relay/queries.sql's blocking_keys, read_in_id_order and fetch_pending as they were.
ID_ORDER_READ = {
    "read_in_id_order": "SET LOCAL enable_sort = off",
    "fetch_pending": """
WITH blockers AS (
    SELECT tenant, key, min(id) AS first_id
      FROM {table}
     WHERE bucket = ANY(%(buckets)s::smallint[]) AND key IS NOT NULL
       AND (status IN ('FAILED', 'SENT')
            OR (status = 'PENDING' AND next_attempt_at IS NOT NULL AND next_attempt_at > now()))
     GROUP BY tenant, key)
SELECT m.id, m.message_id::text, m.topic, m.key, m.payload, m.headers, m.attempts, m.created_at,
       m.bucket, m.tenant
  FROM {table} m
 WHERE m.status = 'PENDING' AND m.bucket = ANY(%(buckets)s::smallint[])
   AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= now())
   AND NOT EXISTS (SELECT 1 FROM blockers b
                    WHERE b.key = m.key AND b.tenant = m.tenant AND b.first_id < m.id)
   AND m.id NOT IN (SELECT unnest(%(exclude)s::bigint[]))
 ORDER BY m.id
 LIMIT %(limit)s""",
}

_own_query = PostgresStore._q


def _q(self: PostgresStore, name: str):
    if name in ID_ORDER_READ:
        return compose(ID_ORDER_READ[name], self._schema)
    return _own_query(self, name)


if __name__ == "__main__":
    PostgresStore._q = _q  # type: ignore[method-assign]
    sys.argv[0] = "outbox"
    main()
