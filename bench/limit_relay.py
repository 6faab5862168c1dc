"""The limit peer: the least work a relay can do and still mark every row it delivered.

Read a batch of PENDING rows in id order, produce them all (acks=all, idempotent producer, the
same linger, batch size and compression as our relay's defaults), flush, mark the batch
CONFIRMED in one UPDATE. No leases, no per-key order logic, no retries, no metrics, no
per-message outcome: one delivery callback that only counts errors (any error stops it). It is
the bound our relay is measured against: ours / limit is our efficiency.

    python bench/limit_relay.py --dsn ... --bootstrap ... [--batch-size 2000] [--until-empty]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import psycopg
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.kafka import DEFAULT_PRODUCER_CONFIG  # the same producer tuning

SELECT = (
    "SELECT id, message_id::text, topic, key, payload FROM local_message "
    "WHERE status = 'PENDING' ORDER BY id LIMIT %s"
)
CONFIRM = "UPDATE local_message SET status = 'CONFIRMED', delivered_at = now() WHERE id = ANY(%s)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--until-empty", action="store_true")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    producer = Producer(
        {
            **DEFAULT_PRODUCER_CONFIG,
            "bootstrap.servers": args.bootstrap,
            "enable.idempotence": "true",
            "acks": "all",
        }
    )
    errors: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    with psycopg.connect(args.dsn, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(SELECT, (args.batch_size,), prepare=True).fetchall()
            if not rows:
                if args.until_empty:
                    break
                stop.wait(0.05)
                continue
            for _, message_id, topic, key, payload in rows:
                while True:
                    try:
                        producer.produce(
                            topic,
                            payload,
                            key,
                            headers=[("message_id", message_id.encode())],
                            on_delivery=on_delivery,
                        )
                        break
                    except BufferError:
                        producer.poll(0.05)
            if producer.flush(30) != 0 or errors:
                raise SystemExit(f"not acknowledged within 30 s: {errors[:3]}")
            conn.execute(CONFIRM, ([row[0] for row in rows],), prepare=True)


if __name__ == "__main__":
    main()
