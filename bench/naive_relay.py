"""The peer a team writes on day one: select pending rows, send each message and wait for its
acknowledgement, update each row. Same table, same producer guarantees (idempotent, acks=all).

    python bench/naive_relay.py --dsn ... --bootstrap ... --until-empty
"""

from __future__ import annotations

import argparse
import signal
import threading

import psycopg
from confluent_kafka import Producer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--until-empty", action="store_true")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    producer = Producer(
        {"bootstrap.servers": args.bootstrap, "enable.idempotence": True, "acks": "all"}
    )
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT id, message_id, topic, key, payload FROM local_message "
                "WHERE status = 'PENDING' ORDER BY id LIMIT 100"
            ).fetchall()
            if not rows:
                if args.until_empty:
                    break
                stop.wait(0.05)
                continue
            for row_id, message_id, topic, key, payload in rows:
                producer.produce(
                    topic,
                    value=payload,
                    key=key,
                    headers=[("message_id", str(message_id).encode())],
                )
                if producer.flush(30) != 0:
                    raise SystemExit("no acknowledgement within 30 s")
                conn.execute(
                    "UPDATE local_message SET status = 'CONFIRMED', "
                    "delivered_at = now() WHERE id = %s",
                    (row_id,),
                )


if __name__ == "__main__":
    main()
