"""Fairness across tenants: a small tenant's commit-to-consumer latency while a large tenant's
backlog drains, with the fair read (ours) and without it (ours-id-order: the read of schema
version 5, every PENDING row in id order), in one run.

    eval "$(scripts/services env)"
    .venv/bin/python bench/fairness.py [--backlog 1000000] [--rate 20] [--seconds 15]

Each variant: a fresh database holding BACKLOG committed rows of tenant `big` (256-byte
payloads, 1,000 keys) on one topic; our relay started with its default settings (LISTENing,
the insert trigger on); once it is draining, tenant `small` commits RATE events/s for SECONDS
on a topic of its own, and a consumer of that topic measures each event's latency from its
COMMIT. Also reported: how fast the backlog drained (its rows/s, by the database's clock).
Results go to bench/results/fairness-<time>/results.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    ID_ORDER_PEERS,
    Env,
    _consumer,
    _writer,
    any_pending,
    fill,
    log,
    start_ours,
    stop,
    use_id_order_index,
)


def confirmed_of(dsn: str, tenant: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT count(*) FROM local_message WHERE tenant = %s AND status = 'CONFIRMED'",
            (tenant,),
        ).fetchone()[0]


def drain_rate(dsn: str, tenant: str) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        n, span = c.execute(
            "SELECT count(*), extract(epoch FROM max(delivered_at) - min(delivered_at))"
            "::double precision FROM local_message WHERE tenant = %s",
            (tenant,),
        ).fetchone()
    return n / span if span else float("nan")


def variant(env: Env, peer: str, backlog: int, rate: int, seconds: float) -> dict:
    dsn = env.fresh_db("bench_fairness", notify=True)
    if peer in ID_ORDER_PEERS:
        use_id_order_index(dsn)
    big = env.fresh_topic("bench.fair.big")
    small = env.fresh_topic("bench.fair.small")
    log(f"  {peer}: filling {backlog:,} rows of tenant big")
    fill(dsn, big, backlog, tenant="big")
    ctx = mp.get_context("spawn")
    expected, count = ctx.Value("i", 0), ctx.Value("i", 0)
    ready, warm, result, done = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    # The consumer waits for the small tenant's events however long the backlog holds them.
    consumer = ctx.Process(
        target=_consumer, args=(env.bootstrap, small, expected, ready, warm, result, 900)
    )
    warm.set()  # no warm-up message: the relay is already busy with the backlog
    proc = start_ours(env, dsn, peer, peer, listen=True)
    writer = None
    try:
        consumer.start()
        if not ready.wait(30):
            raise RuntimeError("the consumer did not start")
        deadline = time.monotonic() + 120
        while confirmed_of(dsn, "big") < 20_000:  # the relay is in the middle of the backlog
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{peer} did not start draining the backlog")
            time.sleep(0.1)
        writer = ctx.Process(
            target=_writer,
            args=(dsn, small, rate, seconds, "local_message", count, done, "small"),
        )
        writer.start()
        committed = done.get(timeout=seconds + 60)
        writer.join(30)
        left_when_written = backlog - confirmed_of(dsn, "big")
        expected.value = count.value
        received = result.get(timeout=900)
        consumer.join(30)
        deadline = time.monotonic() + 900
        while any_pending(dsn):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{peer} did not drain the backlog")
            time.sleep(0.2)
    finally:
        for child in (consumer, writer):
            if child is not None and child.is_alive():
                child.kill()
        stop(proc)
    lat = sorted(t - committed[stamp] for stamp, _, t in received)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")

    return {
        "peer": peer,
        "backlog": backlog,
        "small_rate": rate,
        "small_written": count.value,
        "small_received": len(received),
        "backlog_left_when_small_stopped": left_when_written,
        "small_p50_ms": pct(50),
        "small_p99_ms": pct(99),
        "small_max_ms": pct(100),
        "backlog_msgs_per_s": drain_rate(dsn, "big"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = Env(os.environ["OUTBOX_DSN"], os.environ["OUTBOX_BOOTSTRAP_SERVERS"])
    out = Path(args.out or ROOT / "bench" / "results" / time.strftime("fairness-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["bench/fairness.py", *sys.argv[1:]]),
        "variants": [],
    }
    for peer in ("ours", "ours-id-order"):
        log(f"fairness: {peer}")
        r = variant(env, peer, args.backlog, args.rate, args.seconds)
        results["variants"].append(r)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        log(
            f"  small tenant p50 {r['small_p50_ms']:.1f} ms, p99 {r['small_p99_ms']:.1f} ms, "
            f"max {r['small_max_ms']:.1f} ms ({r['small_received']}/{r['small_written']}); "
            f"backlog {r['backlog_msgs_per_s']:,.0f} msgs/s, "
            f"{r['backlog_left_when_small_stopped']:,} rows left when the small tenant stopped"
        )
    print(json.dumps(results, indent=2))
    log(f"results in {out}")


if __name__ == "__main__":
    main()
