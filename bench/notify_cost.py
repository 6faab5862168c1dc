"""What the NOTIFY trigger costs writers: the same write load with the trigger on and off, in
one run, on the local PostgreSQL.

    .venv/bin/python bench/notify_cost.py [--writers 8] [--seconds 10] [--rows-per-tx 1]

Each writer commits transactions of --rows-per-tx events through outbox.publish_many() as fast
as it can. Reports commits/s for both settings and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import outbox
from bench.writer_cost import commits_per_writer

SCHEMA = "bench_notify"


def run(dsn: str, writers: int, seconds: float, rows_per_tx: int) -> float:
    batch = [
        dict(topic="bench", key=f"k{i}", payload={"pad": "x" * 200}) for i in range(rows_per_tx)
    ]
    commits = commits_per_writer(
        dsn, writers, seconds, lambda conn, _n, _i: outbox.publish_many(conn, batch, schema=SCHEMA)
    )
    return sum(commits) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rows-per-tx", type=int, default=1)
    args = parser.parse_args()
    dsn = os.environ["OUTBOX_DSN"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        outbox.apply_schema(conn, SCHEMA)
    results = {}
    try:
        for setting in ("ENABLE", "DISABLE", "ENABLE", "DISABLE"):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    f"ALTER TABLE {SCHEMA}.local_message {setting} TRIGGER local_message_notify"
                )
                conn.execute(f"TRUNCATE {SCHEMA}.local_message")
            rate = run(dsn, args.writers, args.seconds, args.rows_per_tx)
            results.setdefault("notify_on" if setting == "ENABLE" else "notify_off", []).append(
                rate
            )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    on, off = max(results["notify_on"]), max(results["notify_off"])
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "writers": args.writers,
        "rows_per_tx": args.rows_per_tx,
        "seconds": args.seconds,
        "commits_per_s_notify_on": round(on),
        "commits_per_s_notify_off": round(off),
        "ratio_on_to_off": round(on / off, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
