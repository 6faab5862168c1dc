"""An InboxConsumer as a real process, for tests that kill a consumer mid-record.

    python -m tests.inbox_consumer_process

Reads INBOX_DSN, INBOX_BOOTSTRAP, INBOX_TOPIC, INBOX_GROUP; handles records until it has
handled the one at offset INBOX_LAST_OFFSET of partition 0, then closes and exits 0 (or exits 3
after INBOX_TIMEOUT seconds, 120 by default, without it). Its
handler inserts the record's message_id and value into the table `effect`. Prints one line per
record handled: `handled PARTITION OFFSET MESSAGE_ID new|skipped`.

INBOX_KILL_AT_OFFSET=N: at partition 0's offset N the process SIGKILLs itself after the record's
transaction committed and before its offset is stored, the window the inbox exists for.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psycopg
from confluent_kafka import Consumer

from outbox.consumer import InboxConsumer, consumer_settings


class KillBeforeStoring:
    """The real consumer, except that storing the offset of one record kills the process."""

    def __init__(self, consumer: Consumer, kill_at: int | None):
        self._consumer = consumer
        self._kill_at = kill_at

    def store_offsets(self, message=None):
        if message.partition() == 0 and message.offset() == self._kill_at:
            print(f"killing myself at offset {self._kill_at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return self._consumer.store_offsets(message=message)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


def handler(conn: psycopg.Connection, msg) -> None:
    mid = dict(msg.headers())["message_id"].decode()
    conn.execute(
        "INSERT INTO effect (message_id, value) VALUES (%s, %s)", (mid, msg.value().decode())
    )


def main() -> int:
    env = os.environ
    kill_at = int(env["INBOX_KILL_AT_OFFSET"]) if env.get("INBOX_KILL_AT_OFFSET") else None
    last = int(env["INBOX_LAST_OFFSET"])
    settings = consumer_settings(
        {
            "bootstrap.servers": env["INBOX_BOOTSTRAP"],
            "group.id": env["INBOX_GROUP"],
            "auto.offset.reset": "earliest",
            # A killed member holds its partitions until its session ends: keep that short.
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    real = Consumer(settings)
    conn = psycopg.connect(env["INBOX_DSN"])
    consumer = InboxConsumer(
        None,
        [env["INBOX_TOPIC"]],
        handler,
        conn=conn,
        group=env["INBOX_GROUP"],
        consumer=KillBeforeStoring(real, kill_at),
    )
    deadline = time.monotonic() + float(env.get("INBOX_TIMEOUT", "120"))
    try:
        while time.monotonic() < deadline:
            handled = consumer.poll_once(1.0)
            if handled is None:
                continue
            print(
                f"handled {handled.partition} {handled.offset} {handled.message_id} "
                f"{'new' if handled.new else 'skipped'}",
                flush=True,
            )
            if handled.partition == 0 and handled.offset == last:
                return 0
        print(f"offset {last} not reached in time", flush=True)
        return 3
    finally:
        consumer.close()
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
