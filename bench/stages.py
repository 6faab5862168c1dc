"""Where a drain's time goes: the relay driven in-process, each stage timed.

    eval "$(scripts/services env)"
    .venv/bin/python bench/stages.py [--rows 200000] [--old-rows 0] [--no-analyze]

Fills a fresh database (and topic) with --old-rows CONFIRMED rows, then --rows PENDING ones
(256-byte payloads, 1,000 keys, VACUUM ANALYZE), builds the relay as `outbox relay` would with
default settings, calls Relay.step() until nothing is left, and prints msgs/s and the seconds
spent in: the reads, the send (Kafka), the confirm UPDATE, the helpers' jobs (the write and the
read, beside each other and the send), and the main thread's wait for them. No harness query runs
meanwhile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import run as run_module
from bench.run import Env, fill
from relay import relay as relay_module
from relay.config import RelayConfig
from relay.runner import build_relay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--old-rows", type=int, default=0)
    parser.add_argument(
        "--no-analyze",
        action="store_true",
        help="start right after the bulk load, without VACUUM ANALYZE",
    )
    args = parser.parse_args()
    run_module.ANALYZE_AFTER_FILL = not args.no_analyze
    env = Env(os.environ["OUTBOX_DSN"], os.environ["OUTBOX_BOOTSTRAP_SERVERS"])
    dsn, topic = env.fresh_db("bench_stages"), env.fresh_topic("bench.stages")
    if args.old_rows:
        fill(dsn, topic + ".old", args.old_rows, status="CONFIRMED")
    fill(dsn, topic, args.rows, start=args.old_rows)
    relay, _ = build_relay(RelayConfig.from_env({**os.environ, "OUTBOX_DSN": dsn}))
    spent: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def call(*a, **kw):
            t = time.monotonic()
            try:
                return original(*a, **kw)
            finally:
                spent[label] = spent.get(label, 0.0) + time.monotonic() - t

        setattr(owner, name, call)

    timed(relay.store, "fetch_pending", "read (first, on the main thread)")
    timed(relay.reader, "fetch_pending", "read (beside the write)")
    timed(relay.store, "mark_confirmed", "confirm UPDATE")
    timed(relay.sink, "send", "send (Kafka)")
    timed(relay, "_write", "helper: write job")
    timed(relay, "_read", "helper: read job")
    timed(relay_module, "wait_for_futures", "waiting for the helper")
    started, total = time.monotonic(), 0
    try:
        while (count := relay.step()) > 0:
            total += count
    finally:
        relay.shutdown()
        relay.sink.close(10)
        relay.close_stores()
    elapsed = time.monotonic() - started
    print(
        f"{total:,} rows ({args.old_rows:,} CONFIRMED already) in {elapsed:.2f} s: "
        f"{total / elapsed:,.0f} msgs/s"
    )
    for label, seconds in spent.items():
        print(f"  {label:24} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
