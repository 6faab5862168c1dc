"""`outbox relay` as a real process, for tests that kill, pause and restart relays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

import outbox

#: Short timings so that takeovers happen within seconds; still valid (lease > flush + 3 + 2 hb).
FAST = {
    "OUTBOX_FLUSH_TIMEOUT": "6",
    "OUTBOX_METADATA_TIMEOUT": "3",
    "OUTBOX_HEARTBEAT_INTERVAL": "1",
    "OUTBOX_LEASE_SECONDS": "12",
    "OUTBOX_BACKOFF_BASE": "0.2",
    "OUTBOX_BACKOFF_MAX": "2",
}


class RelayProcess:
    def __init__(self, name: str, dsn: str, bootstrap: str, log_dir: Path, **env: str):
        self.name = name
        self.log_path = log_dir / f"relay-{name}.log"
        self._log = open(self.log_path, "ab")
        environ = {
            **os.environ,
            **FAST,
            "OUTBOX_DSN": dsn,
            "OUTBOX_BOOTSTRAP_SERVERS": bootstrap,
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "relay", "--name", name, "--no-listen"],
            env=environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in TIMEOUT. Returns the exit code."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"relay {self.name} did not stop within {timeout}s") from exc
        finally:
            self._log.close()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_started(self, timeout: float = 60.0) -> None:
        """Until its loop runs (it logs "started"): a SIGTERM before that meets Python's default
        handler, not the relay's drain, and the process ends with -15 having done nothing."""
        wait_for(
            lambda: " started" in self.log() or not self.alive(),
            timeout,
            f"relay {self.name} to start",
        )


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def counts(dsn):
    with psycopg.connect(dsn) as c:
        return dict(c.execute("SELECT status, count(*) FROM local_message GROUP BY 1").fetchall())


def all_confirmed(dsn, total):
    return counts(dsn).get("CONFIRMED", 0) == total


def write(dsn, topic, n, keys, start=0, per_tx=100):
    with psycopg.connect(dsn) as conn:
        for base in range(start, start + n, per_tx):
            with conn.transaction():
                outbox.publish_many(
                    conn,
                    [
                        dict(topic=topic, key=f"key-{i % keys}", payload={"i": i})
                        for i in range(base, min(base + per_tx, start + n))
                    ],
                )
