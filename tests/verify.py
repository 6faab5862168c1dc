"""An independent verifier: compares what the outbox table says with what Kafka holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from tests.kafka_helpers import read_all


@dataclass
class Verdict:
    rows: int = 0
    received: int = 0
    missing: list[int] = field(default_factory=list)
    duplicates: int = 0
    inversions: list[str] = field(default_factory=list)
    not_confirmed: dict[str, int] = field(default_factory=dict)

    def assert_clean(self, allow_duplicates: bool = True) -> None:
        assert not self.missing, f"{len(self.missing)} messages lost, e.g. rows {self.missing[:10]}"
        assert not self.inversions, f"per-key order broken: {self.inversions[:5]}"
        assert not self.not_confirmed, f"rows not CONFIRMED: {self.not_confirmed}"
        if not allow_duplicates:
            assert self.duplicates == 0, f"{self.duplicates} duplicates"


def verify(dsn: str, bootstrap: str, topic: str, timeout: float = 60.0) -> Verdict:
    """Every row in Kafka, none twice unless allowed, and each key's rows in id order. A row
    that was scheduled (held: deliver_at later than created_at) takes its place in its key's
    order when it falls due (docs/guarantees.md), after rows of higher ids sent meanwhile: it
    is checked for loss and duplicates, not for its place among its key's ids."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, message_id::text, key, status, "
            "coalesce(deliver_at > created_at, false) FROM local_message WHERE topic = %s "
            "ORDER BY id",
            (topic,),
        ).fetchall()
    verdict = Verdict(rows=len(rows))
    for _, _, _, status, _ in rows:
        if status != "CONFIRMED":
            verdict.not_confirmed[status] = verdict.not_confirmed.get(status, 0) + 1
    received = read_all(bootstrap, topic, expected=len(rows), timeout=timeout)
    verdict.received = len(received)
    row_of = {mid: (row_id, None if held else key) for row_id, mid, key, _, held in rows}
    # Kafka order of first occurrences, per partition (a key lives in one partition).
    seen: set[str] = set()
    last_row_of_key: dict[bytes, int] = {}
    for msg in sorted(received, key=lambda m: (m.partition, m.offset)):
        mid = (msg.header("message_id") or b"").decode()
        if mid in seen:
            verdict.duplicates += 1
            continue
        seen.add(mid)
        if mid not in row_of:
            continue
        row_id, key = row_of[mid]
        if key is not None:
            previous = last_row_of_key.get(key)
            if previous is not None and previous > row_id:
                verdict.inversions.append(f"key {key!r}: row {row_id} after row {previous}")
            last_row_of_key[key] = max(previous or 0, row_id)
    verdict.missing = [row_id for row_id, mid, *_ in rows if mid not in seen]
    return verdict
