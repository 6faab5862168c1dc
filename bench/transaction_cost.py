"""What Kafka transactions cost on this broker: the groundwork for an exactly-once mode.

    eval "$(scripts/services env)"
    .venv/bin/python bench/transaction_cost.py [--messages 200000] [--batch 2000] [--shards 16]

Kafka only, no database: the same 256-byte messages produced in batches, one batch in flight
at a time (as the relay's loop sends them), with the relay's producer settings, in one run,
alternating, twice each:

  flush         idempotent producer, acks=all: produce the batch, flush() (at-least-once today)
  transaction   one transactional producer: begin, produce the batch and one progress record
                (the batch's row ids, 8 bytes each) to a compacted topic, commit
  shards        SHARDS transactional producers (transactional.id <prefix>-<shard>), batches
                taken by the shards in turn, each one transaction as above

and, for latency, small batches (--small, 20 messages: 2,000 msgs/s in transactions 10 ms
apart) timed one by one: flush() against begin + produce + commit. Prints msgs/s and the
ratio to `flush` for the drains, p50/p99/max ms for the small batches.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.kafka import DEFAULT_PRODUCER_CONFIG, REQUIRED_PRODUCER_CONFIG  # the relay's tuning

PAYLOAD = b'{"i":"00000000","pad":"' + b"x" * 231 + b'"}'  # 256 bytes


def make_topics(bootstrap: str, topic: str, progress: str, shards: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [
            NewTopic(topic, num_partitions=6, replication_factor=1),
            NewTopic(
                progress,
                num_partitions=shards,
                replication_factor=1,
                config={"cleanup.policy": "compact"},
            ),
        ]
    )
    for f in futures.values():
        f.result(30)


def producer(bootstrap: str, transactional_id: str | None = None) -> Producer:
    config = {
        **DEFAULT_PRODUCER_CONFIG,
        **REQUIRED_PRODUCER_CONFIG,
        "bootstrap.servers": bootstrap,
        "log_level": "3",  # not the CONFWARN of enable.gapless.guarantee on every producer
    }
    if transactional_id:
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = "60000"
        # librdkafka: a message's timeout may not exceed its transaction's (0, no timeout,
        # is the relay's: its batch deadline is flush_timeout).
        config["message.timeout.ms"] = "60000"
    p = Producer(config)
    if transactional_id:
        p.init_transactions(30)
    return p


def produce_batch(p: Producer, topic: str, first_id: int, size: int) -> None:
    for i in range(first_id, first_id + size):
        while True:
            try:
                p.produce(topic, PAYLOAD, key=b"k%d" % (i % 500))
                break
            except BufferError:
                p.poll(0.05)


def progress_record(first_id: int, size: int) -> bytes:
    return struct.pack(f">{size}q", *range(first_id, first_id + size))


def drain_flush(bootstrap: str, topic: str, messages: int, batch: int) -> float:
    p = producer(bootstrap)
    started = time.perf_counter()
    for first in range(0, messages, batch):
        produce_batch(p, topic, first, batch)
        if p.flush(30) != 0:
            raise RuntimeError("flush timed out")
    return messages / (time.perf_counter() - started)


def drain_transactions(
    bootstrap: str, topic: str, progress: str, messages: int, batch: int, shards: int, run: str
) -> float:
    producers = [producer(bootstrap, f"bench-{run}-{s}") for s in range(shards)]
    started = time.perf_counter()
    for n, first in enumerate(range(0, messages, batch)):
        shard = n % shards
        p = producers[shard]
        p.begin_transaction()
        produce_batch(p, topic, first, batch)
        p.produce(progress, progress_record(first, batch), key=b"%d" % shard, partition=shard)
        p.commit_transaction(30)
    rate = messages / (time.perf_counter() - started)
    for p in producers:
        p.flush(10)
    return rate


def small_batches(
    bootstrap: str, topic: str, progress: str, size: int, count: int, transactional: bool
) -> list[float]:
    p = producer(bootstrap, f"bench-small-{uuid.uuid4().hex[:8]}" if transactional else None)
    times = []
    for n in range(count + 5):  # the first 5 not timed: the producer's id, the metadata
        started = time.perf_counter()
        if transactional:
            p.begin_transaction()
        produce_batch(p, topic, n * size, size)
        if transactional:
            p.produce(progress, progress_record(n * size, size), key=b"0", partition=0)
            p.commit_transaction(30)
        elif p.flush(30) != 0:
            raise RuntimeError("flush timed out")
        if n >= 5:
            times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)  # the pace of a 2,000 msgs/s writer committing every 10 ms
    return times


def percentiles(times: list[float]) -> str:
    s = sorted(times)
    return f"p50 {s[len(s) // 2]:.1f}, p99 {s[int(len(s) * 0.99)]:.1f}, max {s[-1]:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--small", type=int, default=20)
    ap.add_argument("--small-count", type=int, default=500)
    args = ap.parse_args()
    bootstrap = os.environ["OUTBOX_BOOTSTRAP_SERVERS"]
    run = uuid.uuid4().hex[:8]
    topic, progress = f"bench.eos.{run}", f"bench.eos.{run}.progress"
    make_topics(bootstrap, topic, progress, args.shards)
    print(f"{args.messages:,} messages of {len(PAYLOAD)} bytes, batches of {args.batch:,}")
    rates: dict[str, list[float]] = {"flush": [], "transaction": [], "shards": []}
    drain_flush(bootstrap, topic, args.messages // 4, args.batch)  # warm-up, not counted
    for attempt in range(2):
        rates["flush"].append(drain_flush(bootstrap, topic, args.messages, args.batch))
        rates["transaction"].append(
            drain_transactions(
                bootstrap, topic, progress, args.messages, args.batch, 1, f"{run}-{attempt}-one"
            )
        )
        rates["shards"].append(
            drain_transactions(
                bootstrap,
                topic,
                progress,
                args.messages,
                args.batch,
                args.shards,
                f"{run}-{attempt}-sh",
            )
        )
    for name, values in rates.items():
        ratios = [v / f for v, f in zip(values, rates["flush"], strict=True)]
        print(
            f"  {name:12} "
            + ", ".join(
                f"{v:,.0f} msgs/s ({r:.2f}x flush)" for v, r in zip(values, ratios, strict=True)
            )
        )
    print(f"small batches of {args.small} every 10 ms, {args.small_count} each:")
    for transactional in (False, True, False, True):
        times = small_batches(
            bootstrap, topic, progress, args.small, args.small_count, transactional
        )
        print(f"  {'transaction' if transactional else 'flush':12} {percentiles(times)}")


if __name__ == "__main__":
    main()
