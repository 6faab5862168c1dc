"""The writer's side of the bill: what recording an event adds to a business transaction.

    eval "$(scripts/services env)"
    .venv/bin/python bench/writer_cost.py [--writers 4] [--seconds 8] [--rows-per-tx 1]

The same load (N writer threads, each committing transactions of --rows-per-tx events with the
same 256-byte JSON payload as fast as it can) against, in one run, alternating, twice each:

  ours            outbox.publish_many() into local_message, schema as shipped
  ours-no-notify  the same, the NOTIFY trigger disabled
  ours-v2-check   the same, with schema v2's topic CHECK ('^[a-zA-Z0-9._-]{1,249}$')
  ours-no-extra   local_message without its message_id, pending, blocking and BRIN indexes
                  and without the trigger: what those cost together
  debezium        an INSERT into Debezium's outbox table (uuid primary key, aggregatetype,
                  aggregateid, type, jsonb payload), as its outbox router expects

Reports, for the best run of each: commits/s, events/s, and WAL bytes per event
(pg_current_wal_lsn() before and after, so with this machine's other activity: keep it idle).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import outbox
from bench.debezium_peer import TABLE_DDL as DEBEZIUM_DDL  # the table it reads

SCHEMA = "bench_writer"
PAYLOAD = {"i": "00000000", "pad": "x" * 222}  # 256 bytes as JSON, like bench/run.py's rows
V2_CHECK = "CHECK (topic ~ '^[a-zA-Z0-9._-]{1,249}$' AND topic NOT IN ('.', '..'))"
#: (The dedup_key index stays: publish() names it in ON CONFLICT. It holds only rows that have
#: a dedup_key, none here.)
EXTRA_INDEXES = (
    "local_message_message_id_key",
    "local_message_pending_group_idx",
    "local_message_blocking_idx",
    "local_message_created_at_brin",
)
VARIANTS = ("ours", "ours-no-notify", "ours-v2-check", "ours-no-extra", "debezium")


def prepare(conn: psycopg.Connection, variant: str) -> None:
    conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    if variant == "debezium":
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        with conn.transaction():
            conn.execute(f"SET LOCAL search_path = {SCHEMA}")
            conn.execute(DEBEZIUM_DDL)
        return
    outbox.apply_schema(conn, SCHEMA)
    table = f"{SCHEMA}.local_message"
    if variant in ("ours-no-notify", "ours-no-extra"):
        conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER local_message_notify")
    if variant == "ours-v2-check":
        conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT local_message_topic_check")
        conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT local_message_topic_check {V2_CHECK}")
    if variant == "ours-no-extra":
        for index in EXTRA_INDEXES:
            conn.execute(f"DROP INDEX {SCHEMA}.{index}")


def write_events(conn: psycopg.Connection, variant: str, n: int, key: str) -> None:
    if variant == "debezium":
        body = json.dumps(PAYLOAD, separators=(",", ":"))
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {SCHEMA}.outbox_event (aggregatetype, aggregateid, type, payload) "
                "VALUES ('bench', %s, 'event', %s::jsonb)",
                [(key, body)] * n,
            )
    else:
        outbox.publish_many(
            conn, [dict(topic="bench", key=key, payload=PAYLOAD)] * n, schema=SCHEMA
        )


def commits_per_writer(
    dsn: str, writers: int, seconds: float, write: Callable[[psycopg.Connection, int, int], None]
) -> list[int]:
    """WRITERS threads, each committing transactions as fast as it can for SECONDS;
    write(conn, writer, commits_so_far) fills one transaction. Returns each one's commits."""
    stop = time.monotonic() + seconds
    commits = [0] * writers

    def writer(n: int) -> None:
        with psycopg.connect(dsn) as conn:
            while time.monotonic() < stop:
                with conn.transaction():
                    write(conn, n, commits[n])
                commits[n] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return commits


def run(dsn: str, variant: str, writers: int, seconds: float, rows_per_tx: int) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        prepare(conn, variant)
        wal_before = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    commits = commits_per_writer(
        dsn,
        writers,
        seconds,
        lambda conn, n, i: write_events(conn, variant, rows_per_tx, f"k{n}-{i % 100}"),
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        wal_after = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    events = sum(commits) * rows_per_tx
    return {
        "variant": variant,
        "commits_per_s": sum(commits) / seconds,
        "events_per_s": events / seconds,
        "wal_bytes_per_event": float(wal_after - wal_before) / max(events, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rows-per-tx", type=int, default=1)
    args = parser.parse_args()
    dsn = os.environ["OUTBOX_DSN"]
    best: dict[str, dict] = {}
    try:
        for _ in range(2):
            for variant in VARIANTS:
                r = run(dsn, variant, args.writers, args.seconds, args.rows_per_tx)
                if variant not in best or r["commits_per_s"] > best[variant]["commits_per_s"]:
                    best[variant] = r
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    base = best["debezium"]["commits_per_s"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; writers {args.writers}, "
        f"{args.rows_per_tx} event(s) per transaction, {args.seconds:g} s per run, best of 2"
    )
    print("| variant | commits/s | events/s | vs debezium | WAL B / event |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        r = best[variant]
        print(
            f"| {variant} | {r['commits_per_s']:,.0f} | {r['events_per_s']:,.0f} | "
            f"{r['commits_per_s'] / base:.2f}x | {r['wal_bytes_per_event']:,.0f} |"
        )


if __name__ == "__main__":
    main()
