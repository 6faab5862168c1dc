"""Where a slow message spent its time: every message of a steady run split into its stages.

    eval "$(scripts/services env)"
    .venv/bin/python bench/stalls.py --rate 2000 --seconds 60

bench/run.py's steady workload (a writer committing RATE messages/s, a transaction every 10 ms,
after one warm-up message; our relay with its defaults, LISTENing; a read_committed consumer),
with each message's latency from its writer's stamp split into
  commit   the writer's stamp (just before its INSERT) to the end of its COMMIT,
  pickup   the end of the COMMIT to the record's Kafka timestamp (set by produce()),
  kafka    produce() to the consumer's poll() returning it.
Every message slower than --threshold is listed by the second it was written in, with its
stages, beside the relay's own log lines (at DEBUG: each slow step's stages, each topic
lookup) and PostgreSQL's checkpoints of that second. The relay's log is kept in OUT/relay.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import Env, log, steady_run  # noqa: E402


def _checkpoints(dsn: str, stop_flag: threading.Event, out: list) -> None:
    """PostgreSQL's checkpoints as they end (pg_stat_checkpointer, PostgreSQL 17+, or
    pg_stat_bgwriter), polled every 50 ms: (time seen, write ms, sync ms)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        view = "pg_stat_checkpointer" if conn.info.server_version >= 170000 else "pg_stat_bgwriter"
        cols = (
            "num_timed + num_requested, write_time, sync_time"
            if view.endswith("pointer")
            else "checkpoints_timed + checkpoints_req, checkpoint_write_time, checkpoint_sync_time"
        )
        last = conn.execute(f"SELECT {cols} FROM {view}").fetchone()
        while not stop_flag.wait(0.05):
            row = conn.execute(f"SELECT {cols} FROM {view}").fetchone()
            if row[0] != last[0]:
                out.append((time.time(), row[1] - last[1], row[2] - last[2]))
            last = row


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def _log_lines(path: Path) -> list[tuple[float, str]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_TIME.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            lines.append((t, line))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threshold", type=float, default=0.1, help="seconds")
    parser.add_argument("--peer", default="ours")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = Env(os.environ["OUTBOX_DSN"], os.environ["OUTBOX_BOOTSTRAP_SERVERS"])
    out = Path(args.out or ROOT / "bench" / "results" / time.strftime("stalls-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    relay_log = out / "relay.log"
    checkpoints: list = []
    cp_stop = threading.Event()
    cp_thread = threading.Thread(target=_checkpoints, args=(env.admin_dsn, cp_stop, checkpoints))
    cp_thread.start()
    try:
        with relay_log.open("w") as log_file:
            written, committed, seen = steady_run(
                env, args.peer, args.rate, args.seconds, {"OUTBOX_LOG_LEVEL": "DEBUG"}, log_file
            )
    finally:
        cp_stop.set()
        cp_thread.join(5)

    rows = []
    for stamp, produced, received in seen:
        t = float(stamp)
        c = committed[stamp]
        rows.append((t, c - t, produced - c, received - produced, received - t, received - c))
    rows.sort()
    print(f"{written:,} written, {len(rows):,} received; percentiles 50/90/99/99.9/100 in ms:")
    for i, name in [
        (1, "commit"),
        (2, "pickup"),
        (3, "kafka"),
        (4, "stamp to consumer"),
        (5, "commit to consumer"),
    ]:
        v = sorted(r[i] for r in rows)
        print(
            f"  {name:20}"
            + "".join(
                f"{v[min(len(v) - 1, int(p / 100 * len(v)))] * 1000:8.1f}"
                for p in (50, 90, 99, 99.9, 100)
            )
        )
    slow = [r for r in rows if r[4] > args.threshold]
    print(f"{len(slow)} messages over {args.threshold * 1000:.0f} ms")
    relay_lines = _log_lines(relay_log)
    by_second: dict[int, list] = {}
    for r in slow:
        by_second.setdefault(int(r[0]), []).append(r)
    for second, group in sorted(by_second.items()):
        worst = max(group, key=lambda r: r[4])
        print(
            f"\n{time.strftime('%H:%M:%S', time.localtime(second))}: {len(group)} slow, worst "
            f"{worst[4] * 1000:.0f} ms = commit {worst[1] * 1000:.0f} + pickup "
            f"{worst[2] * 1000:.0f} + kafka {worst[3] * 1000:.0f}"
        )
        lo, hi = second - 1, second + 2
        for t, line in relay_lines:
            if lo <= t <= hi:
                print("   relay:", line[:200])
        for t, write_ms, sync_ms in checkpoints:
            if lo <= t <= hi:
                print(f"   checkpoint ended: write {write_ms:.0f} ms, sync {sync_ms:.0f} ms")
    (out / "stalls.json").write_text(json.dumps({"rows": rows, "checkpoints": checkpoints}))
    log(f"results in {out}")


if __name__ == "__main__":
    main()
