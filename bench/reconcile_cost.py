"""What `outbox reconcile` costs: CONFIRMED rows checked per second, against the floor for any
reader, a bare confluent-kafka consumer reading the same records from the beginning.

    eval "$(scripts/services env)"
    .venv/bin/python bench/reconcile_cost.py [--rows 200000] [--rounds 2]

Set-up (not timed): a fresh database and a topic of 6 partitions; ROWS committed rows (256-byte
JSON payloads over 1,000 keys, time-ordered message_ids, as bench/run.py's drain) delivered by
`outbox relay --once`, so that every row's partition and offset are the relay's own; then
VACUUM ANALYZE. Timed, alternating, ROUNDS times each, every one a process of its own from
start to exit:

  baseline    a consumer assigned to every partition at offset 0 (read_committed, as
              reconcile) that consume()s until it has had ROWS records: nothing compared
  reconcile   `outbox reconcile --since 1h --json`: the rows read in keyset pages along the
              primary key (on a thread of their own), every record read and compared, the
              report

Prints rows/s for each and reconcile's ratio to the baseline of the same round, and, from one
more run in this process, how long the database's side alone took (every page read in turn).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import outbox  # noqa: E402
from bench.topics import create_topic, delete_topic  # noqa: E402

PY = sys.executable
PARTITIONS = 6
KEYS = 1000
PAD = 256 - 25  # a 256-byte payload, as bench/run.py's


def log(msg: str) -> None:
    print(f"[reconcile-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fresh_db(admin_dsn: str, name: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as c:
        outbox.apply_schema(c)
        c.execute("ALTER TABLE local_message DISABLE TRIGGER local_message_notify")
    return dsn


def fresh_topic(bootstrap: str) -> str:
    name = f"bench.reconcile.{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, name, PARTITIONS)  # leaders elected before the relay produces
    return name


def fill(dsn: str, topic: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for lo in range(0, n, 50_000):
            hi = min(lo + 50_000, n)
            c.execute(
                "INSERT INTO local_message (message_id, topic, key, payload) "
                "SELECT ('01800000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, %s, "
                f"convert_to('key-' || (i %% {KEYS}), 'UTF8'), "
                'convert_to(\'{"i":"\' || lpad(i::text, 8, \'0\') || \'","pad":"\' || '
                f"repeat('x', {PAD}) || '\"}}', 'UTF8') "
                "FROM generate_series(%s::bigint, %s::bigint) AS i",
                (topic, lo, hi - 1),
            )


def deliver(dsn: str, bootstrap: str, n: int) -> float:
    started = time.monotonic()
    subprocess.run(
        [PY, "-m", "relay", "relay", "--once", "--no-listen", "--name", "bench-reconcile"],
        env={**os.environ, "OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap},
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
    )
    with psycopg.connect(dsn, autocommit=True) as c:
        done = c.execute(
            "SELECT count(*) FROM local_message WHERE status = 'CONFIRMED' "
            "AND kafka_offset IS NOT NULL"
        ).fetchone()[0]
        c.execute("VACUUM ANALYZE local_message")
    if done != n:
        raise RuntimeError(f"the relay confirmed {done} of {n} rows")
    return time.monotonic() - started


def read_all(bootstrap: str, topic: str, n: int) -> None:
    """The baseline, run in a process of its own (--read-all)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    seen = 0
    deadline = time.monotonic() + 300
    while seen < n and time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=0.2):
            if msg.error() is None:
                seen += 1
    consumer.close()
    if seen < n:
        raise SystemExit(f"read {seen} of {n} records in 300 s")


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run(
        args, env=env, cwd=ROOT, check=False, capture_output=True, text=True, timeout=600
    )
    seconds = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"{args[2:4]} exited {out.returncode}: {out.stderr[-2000:]}")
    return seconds, out.stdout


def selection_seconds(dsn: str) -> tuple[float, int]:
    """The database's side alone: every page of the window read, on this thread."""
    import datetime as dt

    from relay.reconcile_rows import Window, read_all

    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.monotonic()
        n = sum(1 for _ in read_all(conn, "public", Window(since=since)))
        return time.monotonic() - started, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--read-all", nargs=2, metavar=("TOPIC", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    bootstrap = os.environ["OUTBOX_BOOTSTRAP_SERVERS"]
    if args.read_all:
        read_all(bootstrap, args.read_all[0], int(args.read_all[1]))
        return
    n = args.rows
    dsn = fresh_db(os.environ["OUTBOX_DSN"], "bench_reconcile")
    topic = fresh_topic(bootstrap)
    try:
        log(f"filling {n:,} rows, delivering them with outbox relay --once")
        fill(dsn, topic, n)
        log(f"  delivered in {deliver(dsn, bootstrap, n):.1f} s")
        env = {**os.environ, "OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap}
        rounds = []
        for r in range(args.rounds):
            base, _ = timed([PY, __file__, "--read-all", topic, str(n)], env)
            took, out = timed([PY, "-m", "relay", "reconcile", "--since", "1h", "--json"], env)
            report = json.loads(out)
            if report["counts"]["ok"] != n:
                raise RuntimeError(f"reconcile found problems: {report['counts']}")
            rounds.append({"baseline_s": base, "reconcile_s": took})
            log(
                f"round {r + 1}: baseline {n / base:,.0f} records/s ({base:.2f} s), reconcile "
                f"{n / took:,.0f} rows/s ({took:.2f} s), ratio {base / took:.2f}"
            )
        db_s, fetched = selection_seconds(dsn)
        assert fetched == n
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}",
            "rows": n,
            "rounds": rounds,
            "selection_s": db_s,
        }
        print(json.dumps(result, indent=2))
    finally:
        delete_topic(bootstrap, topic)


if __name__ == "__main__":
    main()
