"""The Debezium peer: builds bench/debezium with Maven and runs it against an outbox table
shaped as Debezium's EventRouter expects (id, aggregatetype, aggregateid, type, payload)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent / "debezium"
SLOT, PUBLICATION = "bench_slot", "bench_pub"

TABLE_DDL = """
CREATE TABLE outbox_event (
    id            uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype varchar(255) NOT NULL,
    aggregateid   varchar(255) NOT NULL,
    type          varchar(255) NOT NULL,
    payload       jsonb        NOT NULL
)"""


def build() -> Path:
    jar_dir = HERE / "target"
    stamp = jar_dir / "classes" / "outboxbench" / "OutboxBench.class"
    sources = [HERE / "pom.xml", *HERE.glob("src/**/*.java")]
    if not stamp.exists() or any(s.stat().st_mtime > stamp.stat().st_mtime for s in sources):
        subprocess.run(
            ["mvn", "-q", "-B", "-f", str(HERE / "pom.xml"), "package", "-DskipTests"],
            check=True,
            timeout=900,
        )
    return jar_dir


def drop_slot(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (SLOT,),
        )


def prepare(dsn: str) -> None:
    """Table, publication and slot. The slot exists before any row is written, so a backlog
    written now is in the WAL the engine will read."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(TABLE_DDL)
        c.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE outbox_event")
        c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))


class Debezium:
    def __init__(self, env, dsn: str, topic: str, expected: int = 0, prepared: bool = False):
        self.env, self.dsn, self.topic, self.expected = env, dsn, topic, expected
        if not prepared:
            prepare(dsn)
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 120) -> None:
        target = build()
        info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        environ = {
            **os.environ,
            "PGHOST": info["host"],
            "PGPORT": str(info["port"]),
            "PGUSER": info["user"],
            "PGPASSWORD": info["password"],
            "PGDATABASE": info["dbname"],
            "BENCH_TOPIC": self.topic,
            "BENCH_BOOTSTRAP": self.env.bootstrap,
            "BENCH_EXPECTED": str(self.expected),
        }
        cp = f"{target / 'classes'}:{target / 'lib'}/*"
        self.proc = subprocess.Popen(
            [
                "java",
                "-Xmx1g",
                "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                "-cp",
                cp,
                "outboxbench.OutboxBench",
            ],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started = time.monotonic()
        line = self.read_line(ready_timeout)
        if line != "READY":
            raise RuntimeError(f"debezium did not start: {line!r} {self.stderr_tail()}")

    def read_line(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def stderr_tail(self) -> str:
        if self.proc and self.proc.poll() is not None and self.proc.stderr:
            return self.proc.stderr.read()[-3000:]
        return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        drop_slot(self.env.admin_dsn)


def fill_events(dsn: str, n: int) -> None:
    from bench.run import KEYS, PAYLOAD_BYTES

    pad = PAYLOAD_BYTES - 25
    with psycopg.connect(dsn, autocommit=True) as c:
        for lo in range(0, n, 50_000):
            hi = min(lo + 50_000, n)
            c.execute(
                "INSERT INTO outbox_event (aggregatetype, aggregateid, type, payload) "
                f"SELECT 'drain', 'key-' || (i %% {KEYS}), 'Event', "
                f"('{{\"i\":\"' || lpad(i::text, 8, '0') || '\",\"pad\":\"' || repeat('x', {pad})"
                " || '\"}')::jsonb FROM generate_series(%s::bigint, %s::bigint) AS i",
                (lo, hi - 1),
            )


def drain_debezium(env, n: int) -> dict:
    from bench.run import cpu_seconds, peak_rss_mb

    drop_slot(env.admin_dsn)
    dsn = env.fresh_db("bench_drain", schema=False)
    topic = env.fresh_topic("bench.drain")
    prepare(dsn)
    with psycopg.connect(dsn, autocommit=True) as c:
        wal0 = c.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    fill_events(dsn, n)
    with psycopg.connect(dsn, autocommit=True) as c:
        wal1 = c.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    dbz = Debezium(env, dsn, topic, expected=n, prepared=True)
    try:
        dbz.start()
        cpu = rss = 0.0
        deadline = time.monotonic() + max(600, n / 100)
        line = None
        while time.monotonic() < deadline:
            if dbz.proc.poll() is None:
                cpu, rss = cpu_seconds(dbz.proc.pid), peak_rss_mb(dbz.proc.pid)
            line = dbz.read_line(0.5)
            if line and line.startswith("DONE"):
                break
            if dbz.proc.poll() is not None:
                raise RuntimeError(f"debezium exited: {dbz.stderr_tail()}")
        if not (line and line.startswith("DONE")):
            raise RuntimeError("debezium did not finish in time")
        ended = time.monotonic()
        _, _count, first_ms, last_ms = line.split()
    finally:
        dbz.stop()
    seconds = (int(last_ms) - int(first_ms)) / 1000
    return {
        "peer": "debezium",
        "messages": n,
        "replicas": 1,
        "confirmed_rows_before": 0,
        "seconds": ended - dbz.started,
        "seconds_after_first": seconds,
        "msgs_per_s": n / max(seconds, 1e-3),
        "msgs_per_s_incl_startup": n / (ended - dbz.started),
        "relay_cpu_s_per_10k": cpu / n * 10_000,
        # Debezium writes nothing back: the WAL of its outbox is the INSERTs' (below); the
        # events stay in the table unless the application deletes them.
        "wal_bytes_per_msg": 0.0,
        "insert_wal_bytes_per_msg": float(wal1 - wal0) / n,
        "row_writes_per_msg_relay": 0.0,
        "peak_rss_mb": rss,
    }
