"""Benchmarks of outbox-relay against its peers, in one run, on the local PostgreSQL and Kafka.

    eval "$(scripts/services env)"
    .venv/bin/python bench/run.py                  # the full run (about half an hour)
    .venv/bin/python bench/run.py --smoke          # about a minute: keeps the harness working
    .venv/bin/python bench/run.py --only drain --peers ours,naive

Workloads (256-byte JSON payloads, 1,000 keys, 6 partitions, acks=all, idempotent producer,
PostgreSQL with fsync and synchronous_commit on):
  drain    a backlog of committed messages; messages/s until all are acknowledged and recorded,
           relay CPU per 10,000 messages, WAL and row writes per message, peak memory
  steady   a writer committing at fixed rates; commit-to-consumer latency p50/p95/p99 measured
           by an independent consumer, and whether the relay keeps up
  scaling  1, 2 and 4 relays; and tables already holding --table-sizes CONFIRMED rows
           (5,000,000 unless told: `--only scaling --peers ours --table-sizes 5000000,20000000`)
  profile  where our relay spends its time at full speed (py-spy)

Peers: `limit` (bench/limit_relay.py: the least work that still marks every row: read a batch,
produce, flush, one UPDATE; drain only, the bound ours is measured against), `naive`
(bench/naive_relay.py: one message at a time), `debezium` (bench/debezium:
the embedded engine with the PostgreSQL connector and the outbox EventRouter), `ours` (default
settings), `ours-fast` (larger batches and linger) and `ours-id-order` (bench/id_order_relay.py:
ours with the read of schema version 5, in id order, not fair across tenants: the fair read's
cost). Results go to bench/results/<time>/
(results.json, report.md, *.png).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import outbox  # noqa: E402
from bench.topics import create_topic, delete_topic  # noqa: E402

PAYLOAD_BYTES = 256
KEYS = 1000
PARTITIONS = 6
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

OURS_ENV = {"OUTBOX_IDLE_POLL_INTERVAL": "0.2"}
PEERS = {
    "ours": {},
    "ours-fast": {
        "OUTBOX_BATCH_SIZE": "10000",
        "OUTBOX_KAFKA_LINGER_MS": "20",
        "OUTBOX_KAFKA_BATCH_SIZE": "2000000",
    },
    # Exactly-once delivery with its defaults (4 shards); its progress topic is made afresh
    # for each run (Env.progress_env).
    "ours-eos": {"OUTBOX_DELIVERY": "exactly-once"},
    "ours-eos-16": {"OUTBOX_DELIVERY": "exactly-once", "OUTBOX_SHARDS": "16"},
    # The read before the fair one (schema version 5's): the fair read's cost (id_order_relay.py)
    "ours-id-order": {},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- plumbing


@dataclass
class Env:
    admin_dsn: str
    bootstrap: str

    def dsn(self, db: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=db)

    def fresh_db(self, name: str, schema: bool = True, notify: bool = False) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as c:
            c.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = self.dsn(name)
        if schema:
            with psycopg.connect(dsn, autocommit=True) as c:
                outbox.apply_schema(c)
                if not notify:  # a relay that polls: a backlog to drain needs no wake-ups
                    c.execute("ALTER TABLE local_message DISABLE TRIGGER local_message_notify")
        return dsn

    def progress_env(self, peer: str) -> dict[str, str]:
        """For exactly-once peers: a fresh progress topic and transactional-id prefix."""
        settings = PEERS.get(peer, {})
        if settings.get("OUTBOX_DELIVERY") != "exactly-once":
            return {}
        from relay.kafka import check_progress_topic

        name = f"bench.progress.{uuid.uuid4().hex[:8]}"
        shards = int(settings.get("OUTBOX_SHARDS", "4"))
        problem = check_progress_topic(
            {"bootstrap.servers": self.bootstrap}, name, shards, create=True
        )
        if problem:
            raise RuntimeError(problem)
        return {
            "OUTBOX_PROGRESS_TOPIC": name,
            "OUTBOX_TRANSACTIONAL_ID_PREFIX": f"bench-{name}",
        }

    def fresh_topic(self, name: str) -> str:
        delete_topic(self.bootstrap, name)
        deadline = time.monotonic() + 60
        while True:
            try:
                create_topic(self.bootstrap, name, partitions=PARTITIONS)
                return name
            except Exception:  # deletion still in progress (re-raised at the deadline)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def payload_sql(i: str) -> str:
    """SQL for a 256-byte JSON payload numbered by expression I."""
    pad = PAYLOAD_BYTES - 25
    return (
        f'convert_to(\'{{"i":"\' || lpad(({i})::text, 8, \'0\') || \'","pad":"\' || '
        f"repeat('x', {pad}) || '\"}}', 'UTF8')"
    )


#: False (--no-analyze): the drain starts right after the bulk load, with whatever statistics
#: autovacuum has gathered by then, as a relay meets a backlog in production.
ANALYZE_AFTER_FILL = True


def fill(
    dsn: str, topic: str, n: int, status: str = "PENDING", start: int = 0, tenant: str = ""
) -> None:
    """N committed rows, keys spread over KEYS, in transactions of 50,000. Their message_ids
    grow with their ids, as publish()'s time-ordered UUIDs do (the column's default is a
    random UUID: with millions of rows, every row's index entry on its own page)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        for lo in range(start, start + n, 50_000):
            hi = min(lo + 50_000, start + n)
            c.execute(
                "INSERT INTO local_message (message_id, topic, key, payload, status, tenant) "
                "SELECT ('01800000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, "
                f"%s, convert_to('key-' || (i %% {KEYS}), 'UTF8'), {payload_sql('i')}, %s, %s "
                "FROM generate_series(%s::bigint, %s::bigint) AS i",
                (topic, status, tenant, lo, hi - 1),
            )
        if ANALYZE_AFTER_FILL:
            c.execute("VACUUM ANALYZE local_message")


def db_counters(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT pg_stat_force_next_flush()")
        lsn = c.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
        ins, upd, dele = c.execute(
            "SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
            "WHERE relname = 'local_message'"
        ).fetchone()
    return {"wal": int(lsn), "writes": ins + upd + dele, "ins": ins, "upd": upd}


def any_pending(dsn: str) -> bool:
    """Whether a PENDING row is left: one probe of the small partial index. (The harness used
    to count CONFIRMED rows every 50 ms; with 5,000,000 of them in the table that count took
    4.2 s on three processes and kept both cores busy, halving every peer's drain.)"""
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT EXISTS (SELECT 1 FROM local_message WHERE status = 'PENDING')"
        ).fetchone()[0]


def delivery_span(dsn: str, first_id: int) -> float:
    """Seconds from the first to the last UPDATE to CONFIRMED of the rows from FIRST_ID on, by
    the database's own clock (delivered_at is the UPDATE's transaction time)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT extract(epoch FROM max(delivered_at) - min(delivered_at))"
            "::double precision "
            "FROM local_message WHERE id >= %s",
            (first_id,),
        ).fetchone()[0]


def confirmed(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(
            "SELECT count(*) FROM local_message WHERE status = 'CONFIRMED'"
        ).fetchone()[0]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_ours(
    env: Env,
    dsn: str,
    peer: str,
    name: str,
    extra: dict | None = None,
    stderr=subprocess.PIPE,
    listen: bool = False,
):
    environ = {
        **os.environ,
        **OURS_ENV,
        **PEERS[peer],
        **(extra or {}),
        "OUTBOX_DSN": dsn,
        "OUTBOX_BOOTSTRAP_SERVERS": env.bootstrap,
    }
    # ours-id-order: the same relay with the read before the fair one (bench/id_order_relay.py)
    command = (
        [PY, str(ROOT / "bench" / "id_order_relay.py")]
        if peer == "ours-id-order"
        else [PY, "-m", "relay"]
    )
    return subprocess.Popen(
        command + ["relay", "--name", name] + ([] if listen else ["--no-listen"]),
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )


def use_id_order_index(dsn: str) -> None:
    """The PENDING index of schema version 5, on (id), instead of version 6's on (tenant,
    topic, id): for the peers that read every PENDING row in id order (limit, naive and
    ours-id-order), so that the table holds the index their read was built for, and as many
    indexes as ours."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "CREATE INDEX local_message_pending_idx ON local_message (id) INCLUDE (bucket) "
            "WHERE status = 'PENDING'"
        )
        c.execute("DROP INDEX local_message_pending_group_idx")


#: Peers that read in id order over schema version 5's PENDING index (use_id_order_index).
ID_ORDER_PEERS = ("limit", "naive", "ours-id-order")


def start_naive(env: Env, dsn: str):
    return subprocess.Popen(
        [PY, str(ROOT / "bench" / "naive_relay.py"), "--dsn", dsn, "--bootstrap", env.bootstrap],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def start_limit(env: Env, dsn: str):
    return subprocess.Popen(
        [PY, str(ROOT / "bench" / "limit_relay.py"), "--dsn", dsn, "--bootstrap", env.bootstrap],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- drain


def drain_ours_like(
    env: Env,
    peer: str,
    n: int,
    replicas: int = 1,
    confirmed_rows: int = 0,
    profile_to: Path | None = None,
) -> dict:
    dsn = env.fresh_db("bench_drain")
    if peer in ID_ORDER_PEERS:
        use_id_order_index(dsn)
    topic = env.fresh_topic("bench.drain")
    if confirmed_rows:
        log(f"  filling {confirmed_rows:,} CONFIRMED rows first")
        fill(dsn, topic + ".old", confirmed_rows, status="CONFIRMED")
    fill(dsn, topic, n, start=confirmed_rows)
    before = db_counters(dsn)
    started = time.monotonic()
    if peer == "naive":
        procs = [start_naive(env, dsn)]
    elif peer == "limit":
        procs = [start_limit(env, dsn)]
    else:
        eos = env.progress_env(peer)
        procs = [start_ours(env, dsn, peer, f"{peer}-{i}", eos) for i in range(replicas)]
    spy = None
    if profile_to is not None and shutil.which("py-spy", path=str(Path(PY).parent)):
        spy = subprocess.Popen(
            [
                str(Path(PY).parent / "py-spy"),
                "record",
                "--format",
                "raw",
                "--rate",
                "200",
                "--pid",
                str(procs[0].pid),
                "--output",
                str(profile_to),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    deadline = started + max(600, n / 50)
    cpu = {p.pid: 0.0 for p in procs}
    rss = {p.pid: 0.0 for p in procs}
    while True:
        now = time.monotonic()
        for p in procs:
            if p.poll() is None:
                cpu[p.pid] = cpu_seconds(p.pid)
                rss[p.pid] = peak_rss_mb(p.pid)
        if not any_pending(dsn):
            break
        if now > deadline or all(p.poll() is not None for p in procs):
            done = confirmed(dsn) - confirmed_rows  # rows CONFIRMED before do not count
            raise RuntimeError(
                f"{peer}: {done}/{n} confirmed, relays "
                f"{[p.poll() for p in procs]}: {procs[0].stderr.read()[-2000:]!r}"
            )
        time.sleep(0.1)
    ended = time.monotonic()
    span = delivery_span(dsn, confirmed_rows + 1)  # the filled rows' ids start after the old
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    for p in procs:
        stop(p)
    after = db_counters(dsn)
    return {
        "peer": peer,
        "messages": n,
        "replicas": replicas,
        "confirmed_rows_before": confirmed_rows,
        "seconds": ended - started,
        "seconds_after_first": span,
        "msgs_per_s": n / span,
        "msgs_per_s_incl_startup": n / (ended - started),
        "relay_cpu_s_per_10k": sum(cpu.values()) / n * 10_000,
        "wal_bytes_per_msg": (after["wal"] - before["wal"]) / n,
        "row_writes_per_msg_relay": (after["writes"] - before["writes"]) / n,
        "peak_rss_mb": max(rss.values()),
    }


# --------------------------------------------------------------------------- steady state


#: The payload stamp of the one message sent through the whole pipe before a steady run.
WARM_UP = "warm-up"


def _writer(
    dsn: str,
    topic: str,
    rate: int,
    seconds: float,
    table: str,
    counter,
    done,
    tenant: str | None = None,
) -> None:
    """Commit RATE messages/s for SECONDS: a transaction every 10 ms carrying rate/100 events,
    each stamped with the wall time taken before its INSERT. Sends back, per stamp, the wall
    time at which its COMMIT returned: latency is counted from there."""
    per_tx = max(1, math.ceil(rate / 100))
    interval = per_tx / rate
    committed: dict[str, float] = {}
    with psycopg.connect(dsn) as conn:
        next_at = time.monotonic()
        end = next_at + seconds
        i = 0
        # Stops at the end even behind its schedule: a writer that could not hold the rate
        # has written less, and says so by its count.
        while next_at < end and time.monotonic() < end:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamp = f"{time.time():.6f}"
            keys = [f"key-{(i + j) % KEYS}" for j in range(per_tx)]
            _insert(conn, topic, table, stamp, keys, tenant)
            conn.commit()
            committed[stamp] = time.time()
            i += per_tx
            counter.value = i  # after every commit: a writer stopped late still counts
            next_at += interval
    done.put(committed)


def _insert(
    conn: psycopg.Connection,
    topic: str,
    table: str,
    stamp: str,
    keys: list[str],
    tenant: str | None = None,
) -> None:
    pad = "x" * (PAYLOAD_BYTES - 40)
    if table == "local_message":
        outbox.publish_many(
            conn,
            [
                {"topic": topic, "key": key, "payload": {"t": stamp, "pad": pad}, "tenant": tenant}
                for key in keys
            ],
        )
    else:  # the Debezium outbox table
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO outbox_event (id, aggregatetype, aggregateid, type, payload)"
                " VALUES (%s, 'drain', %s, 'Event', %s)",
                [(uuid.uuid4(), key, json.dumps({"t": stamp, "pad": pad})) for key in keys],
            )


def _consumer(bootstrap: str, topic: str, expected, ready, warm, result, timeout: float) -> None:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
            "isolation.level": "read_committed",
        }
    )
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    ready.set()
    received: list[tuple[str, float, float]] = []  # (stamp, Kafka timestamp, wall time now)
    seen = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected.value and len(seen) >= expected.value:
            break
        # poll(), not consume(n, timeout): consume waits for n messages or the whole timeout,
        # which would add up to the timeout to every latency measured.
        msg = c.poll(0.05)
        if msg is not None and not msg.error():
            now = time.time()
            body = json.loads(msg.value())
            if isinstance(body, str):  # Debezium without expand.json.payload
                body = json.loads(body)
            if body["t"] == WARM_UP:
                warm.set()
                continue
            mid = dict(msg.headers() or []).get("message_id") or msg.key() + str(body["t"]).encode()
            if mid not in seen:
                seen.add(mid)
                received.append((body["t"], msg.timestamp()[1] / 1000, now))
    c.close()
    result.put(received)


def steady_run(
    env: Env,
    peer: str,
    rate: int,
    seconds: float,
    relay_extra: dict | None = None,
    relay_stderr=subprocess.PIPE,
) -> tuple[int, dict[str, float], list]:
    """One steady run: (messages written, {stamp: COMMIT end}, [(stamp, produced, received)]).
    Our relay runs with its defaults here: the insert trigger's NOTIFY on, and LISTENing."""
    ctx = mp.get_context("spawn")
    if peer == "debezium":
        from bench.debezium_peer import Debezium, drop_slot

        drop_slot(env.admin_dsn)
        dsn = env.fresh_db("bench_steady", schema=False)
        topic = env.fresh_topic("bench.steady")
        dbz = Debezium(env, dsn, topic)
        dbz.start()
        table = "outbox_event"
    else:
        dsn = env.fresh_db("bench_steady", notify=True)
        if peer in ID_ORDER_PEERS:
            use_id_order_index(dsn)
        topic = env.fresh_topic("bench.steady")
        proc = (
            start_naive(env, dsn)
            if peer == "naive"
            else start_ours(
                env,
                dsn,
                peer,
                peer,
                {**env.progress_env(peer), **(relay_extra or {})},
                relay_stderr,
                listen=True,
            )
        )
        table = "local_message"
    expected, count = ctx.Value("i", 0), ctx.Value("i", 0)
    ready, warm, result, done = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    consumer = ctx.Process(
        target=_consumer, args=(env.bootstrap, topic, expected, ready, warm, result, seconds + 90)
    )
    try:
        consumer.start()
        if not ready.wait(30):
            raise RuntimeError("the consumer did not start")
        # One message through the whole pipe first: the relay's (or Debezium's) start-up, its
        # producer's connection and idempotence handshake, is not part of the steady state.
        with psycopg.connect(dsn) as conn:
            _insert(conn, topic, table, WARM_UP, ["warm-up"])
        if not warm.wait(60):
            raise RuntimeError(f"{peer} did not deliver the warm-up message within 60 s")
        writer = ctx.Process(target=_writer, args=(dsn, topic, rate, seconds, table, count, done))
        writer.start()
        committed = done.get(timeout=seconds + 60)
        writer.join(30)
        expected.value = count.value
        received = result.get(timeout=seconds + 120)
        consumer.join(30)
    finally:  # never leave a relay behind: it would join the next run's database
        for child in (consumer, locals().get("writer")):
            if child is not None and child.is_alive():
                child.kill()
        if peer == "debezium":
            dbz.stop()
        else:
            stop(proc)
    return count.value, committed, received


def steady(env: Env, peer: str, rate: int, seconds: float) -> dict:
    written, committed, received = steady_run(env, peer, rate, seconds)
    lat = sorted(t - committed[stamp] for stamp, _, t in received)

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")

    # A writer that could not commit at RATE (the machine is shared) offered less: no verdict.
    offered = written >= rate * seconds * 0.99
    return {
        "peer": peer,
        "rate": rate,
        "seconds": seconds,
        "written": written,
        "writer_kept_rate": offered,
        "received": len(received),
        "keeps_up": offered and len(received) >= written and (pct(99) < 1000),
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "max_ms": pct(100),
    }


# --------------------------------------------------------------------------- profile


def summarize_profile(raw: Path, top: int = 15) -> list[tuple[str, float]]:
    """Self time per function from py-spy's raw (collapsed stack) output."""
    self_time: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        self_time[leaf] = self_time.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    return [(name, 100.0 * n / total) for name, n in ranked]


# --------------------------------------------------------------------------- report


def report(results: dict, out: Path) -> None:
    lines = [
        f"# Benchmark run {results['started']}",
        "",
        f"Machine: {results['machine']}",
        f"Command: `{results['command']}`",
        "",
    ]
    drains = results.get("drain", [])
    if drains:
        base = {d["peer"]: d for d in drains}
        lines += [
            "## Drain",
            "",
            "| peer | messages | msgs/s | vs limit | vs debezium | vs naive | vs ours-id-order | "
            "relay CPU s / 10k | WAL B / msg | row writes / msg (relay) | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in drains:
            vs = []
            for other in ("limit", "debezium", "naive", "ours-id-order"):
                o = base.get(other)
                vs.append(f"{d['msgs_per_s'] / o['msgs_per_s']:.2f}x" if o and o is not d else "-")
            lines.append(
                f"| {d['peer']} | {d['messages']:,} | {d['msgs_per_s']:,.0f} | {vs[0]} | {vs[1]} "
                f"| {vs[2]} | {vs[3]} "
                f"| {d['relay_cpu_s_per_10k']:.2f} | {d['wal_bytes_per_msg']:.0f} | "
                f"{d['row_writes_per_msg_relay']:.2f} | {d['peak_rss_mb']:.0f} |"
            )
        lines.append("")
    if results.get("steady"):
        lines += [
            "## Steady state (commit to consumer)",
            "",
            "| peer | rate msg/s | p50 ms | p95 ms | p99 ms | max ms | keeps up |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in results["steady"]:
            lines.append(
                f"| {s['peer']} | {s['rate']:,} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} "
                f"| {s['p99_ms']:.1f} | {s['max_ms']:.1f} | "
                f"{'yes' if s['keeps_up'] else 'NO'} ({s['received']:,}/{s['written']:,}"
                f"{'' if s.get('writer_kept_rate', True) else ', writer fell behind'}) |"
            )
        lines.append("")
    if results.get("scaling"):
        lines += [
            "## Scaling (our relay, default settings)",
            "",
            "| relays | CONFIRMED rows already in the table | msgs/s |",
            "|---|---|---|",
        ]
        for s in results["scaling"]:
            lines.append(
                f"| {s['replicas']} | {s['confirmed_rows_before']:,} | {s['msgs_per_s']:,.0f} |"
            )
        lines.append("")
    if results.get("profile"):
        lines += [
            "## Profile of `ours-fast` at full speed (py-spy, self time)",
            "",
            "| function | % of samples |",
            "|---|---|",
        ]
        for name, share in results["profile"]:
            lines.append(f"| `{name}` | {share:.1f} |")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))
    plot(results, out)


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return
    drains = results.get("drain", [])
    if drains:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(
            [d["peer"] for d in drains],
            [d["msgs_per_s"] for d in drains],
            color=[
                "#999" if d["peer"] in ("limit", "naive", "debezium") else "#2a7" for d in drains
            ],
        )
        ax.set_ylabel("messages/s (drain)")
        ax.set_title("Drain throughput, same machine, same run")
        for i, d in enumerate(drains):
            ax.text(i, d["msgs_per_s"], f"{d['msgs_per_s']:,.0f}", ha="center", va="bottom")
        fig.tight_layout()
        fig.savefig(out / "drain.png", dpi=110)
    if results.get("steady"):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for peer in sorted({s["peer"] for s in results["steady"]}):
            rows = [s for s in results["steady"] if s["peer"] == peer]
            ax.plot(
                [s["rate"] for s in rows],
                [s["p99_ms"] for s in rows],
                marker="o",
                label=f"{peer} p99",
            )
            ax.plot(
                [s["rate"] for s in rows],
                [s["p50_ms"] for s in rows],
                marker=".",
                linestyle="--",
                label=f"{peer} p50",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("committed messages/s")
        ax.set_ylabel("commit-to-consumer latency, ms")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="drain,steady,scaling,profile")
    parser.add_argument("--peers", default="limit,naive,debezium,ours,ours-fast")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rates", default=None, help="steady's rates, e.g. 2000,10000")
    parser.add_argument(
        "--table-sizes",
        default="5000000",
        help="scaling: delivered rows kept in the table, e.g. 5000000,20000000",
    )
    parser.add_argument(
        "--no-analyze",
        action="store_true",
        help="drain right after the bulk load, without VACUUM ANALYZE",
    )
    args = parser.parse_args()
    global ANALYZE_AFTER_FILL
    ANALYZE_AFTER_FILL = not args.no_analyze
    env = Env(os.environ["OUTBOX_DSN"], os.environ["OUTBOX_BOOTSTRAP_SERVERS"])
    only, peers = args.only.split(","), args.peers.split(",")
    out = Path(args.out or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB, "
        f"Python {platform.python_version()}",
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
    }

    def save() -> None:  # after every workload, so that a failure later keeps what was measured
        (out / "results.json").write_text(json.dumps(results, indent=2))

    n = 20_000 if args.smoke else 200_000
    naive_n = 2_000 if args.smoke else 20_000
    if "drain" in only:
        results["drain"] = []
        for peer in peers:
            log(f"drain: {peer}")
            if peer == "debezium":
                from bench.debezium_peer import drain_debezium

                results["drain"].append(drain_debezium(env, n))
            else:
                results["drain"].append(
                    drain_ours_like(env, peer, naive_n if peer == "naive" else n)
                )
            log(f"  {results['drain'][-1]['msgs_per_s']:,.0f} msgs/s")
            save()
    if "steady" in only:
        results["steady"] = []
        rates = (
            [int(r) for r in args.rates.split(",")]
            if args.rates
            else [500]
            if args.smoke
            else [500, 2000, 5000, 10000, 20000]
        )
        seconds = 5 if args.smoke else 60
        for peer in [p for p in peers if p not in ("ours-fast", "limit")]:
            for rate in rates:
                if peer == "naive" and rate > 2000:
                    continue  # it cannot: one acknowledgement per message
                log(f"steady: {peer} at {rate}/s for {seconds}s")
                r = steady(env, peer, rate, seconds)
                results["steady"].append(r)
                log(
                    f"  p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                    f"keeps up: {r['keeps_up']}"
                )
                save()
                if not r["keeps_up"]:
                    break
    if "scaling" in only and "ours" in peers:
        results["scaling"] = []
        sizes = [int(size) for size in args.table_sizes.split(",") if size and int(size) > 0]
        for replicas, old in (
            [(1, 0), (2, 0)]
            if args.smoke
            else [(1, 0), (2, 0), (4, 0)] + [(1, size) for size in sizes]
        ):
            log(f"scaling: {replicas} relays, {old:,} CONFIRMED rows already")
            results["scaling"].append(drain_ours_like(env, "ours", n, replicas, old))
            save()
    if "profile" in only and "ours-fast" in peers:
        raw = out / "profile.txt"
        log("profile: ours-fast")
        drain_ours_like(env, "ours-fast", n, profile_to=raw)
        if raw.exists():
            results["profile"] = summarize_profile(raw)
    save()
    report(results, out)
    print((out / "report.md").read_text())
    log(f"results in {out}")


if __name__ == "__main__":
    main()
