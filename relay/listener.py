"""LISTEN for the insert trigger's NOTIFY: only a hint to wake up early. Polling stays the
source of truth, so a lost notification or a dead listener costs latency, never a message."""

from __future__ import annotations

import logging
import threading
import time

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "outbox_local_message"


class Listener:
    def __init__(self, dsn: str, schema: str):
        self._dsn = dsn
        self._schema = schema
        self._conn: psycopg.Connection | None = None
        self._retry_at = 0.0

    def _connect(self) -> psycopg.Connection | None:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if time.monotonic() < self._retry_at:
            return None
        try:
            self._conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=5,
                application_name="outbox-relay-listen",
            )
            self._conn.execute(f"LISTEN {CHANNEL}")
            return self._conn
        except psycopg.Error as exc:
            log.warning("LISTEN unavailable, polling only for now: %s", exc)
            self._conn = None
            self._retry_at = time.monotonic() + 10.0
            return None

    def wait(self, timeout: float, stop: threading.Event | None = None) -> None:
        """Return after a notification for our schema, after TIMEOUT seconds, or soon after
        STOP is set (it is looked at every quarter second)."""
        stop = stop or threading.Event()
        deadline = time.monotonic() + timeout
        conn = self._connect()
        if conn is None:
            stop.wait(timeout)
            return
        try:
            while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
                for note in conn.notifies(timeout=min(left, 0.25), stop_after=1):
                    if note.payload == self._schema:
                        return
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost: %s", exc)
            self.close()
            stop.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
