"""Exactly-once delivery against the real pair: each row once in Kafka for a read_committed
consumer, recovery from the progress records, fencing, and the refusals at start."""

from __future__ import annotations

import os
import threading
import time
import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from relay.config import ConfigError, RelayConfig
from relay.kafka import check_progress_topic
from relay.model import Delivered, Failed, FailureKind, PendingMessage
from relay.runner import build_relay, check_exactly_once, run_relay
from relay.shards import buckets_of, decode_progress
from tests.kafka_helpers import create_topic, delete_topic, read_all
from tests.relay_process import counts, write
from tests.verify import verify

SHARDS = 4


@pytest.fixture
def progress_topic(bootstrap):
    name = f"progress.{uuid.uuid4().hex[:12]}"
    assert check_progress_topic({"bootstrap.servers": bootstrap}, name, SHARDS, create=True) is None
    yield name
    delete_topic(bootstrap, name)


def eos_config(dsn, bootstrap, progress_topic, **overrides) -> RelayConfig:
    settings = {
        "dsn": dsn,
        "bootstrap_servers": bootstrap,
        "delivery": "exactly-once",
        "shards": SHARDS,
        "progress_topic": progress_topic,
        # A prefix of its own: no other test's producers are fenced.
        "transactional_id_prefix": f"test-{uuid.uuid4().hex[:8]}",
        "listen": False,
    }
    return RelayConfig.from_env({}, **{**settings, **overrides})


def test_each_row_reaches_a_read_committed_consumer_once(dsn, bootstrap, topic, progress_topic):
    write(dsn, topic, 3000, keys=40)
    cfg = eos_config(dsn, bootstrap, progress_topic, batch_size=500)
    assert run_relay(cfg, threading.Event(), until_idle=True) == 0
    verdict = verify(dsn, bootstrap, topic)
    verdict.assert_clean(allow_duplicates=False)
    assert verdict.received == 3000
    # Every shard that carried rows has committed progress naming only rows of its buckets.
    last = last_progress(bootstrap, progress_topic)
    with psycopg.connect(dsn) as conn:
        bucket_of = dict(conn.execute("SELECT id, bucket FROM local_message").fetchall())
    assert last, "no progress record was committed"
    for shard, rows in last.items():
        assert rows and {bucket_of[i] for i, _ in rows} <= set(buckets_of(shard, SHARDS))


def last_progress(bootstrap, progress_topic) -> dict[int, list[tuple[int, bytes]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        consumer.assign([TopicPartition(progress_topic, s, 0) for s in range(SHARDS)])
        found: dict[int, list[tuple[int, bytes]]] = {}
        open_ = set(range(SHARDS))
        for _ in range(200):
            if not open_:
                break
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                open_.discard(msg.partition())
                continue
            found[msg.partition()] = decode_progress(msg.value(), SHARDS, msg.partition())
        assert not open_, f"partitions {open_} not read to their end"
        return found
    finally:
        consumer.close()


class LostWrite(psycopg.OperationalError):
    pass


def dying_before_its_update(cfg: RelayConfig, lost_rows: list[Delivered] | None = None):
    """A relay whose every UPDATE to CONFIRMED fails: as if it died after each commit.
    LOST_ROWS, if given, collects the rows those UPDATEs would have confirmed."""
    relay, _ = build_relay(cfg)

    def lost(_relay_id, delivered, *_args, **_kwargs):
        if lost_rows is not None:
            lost_rows.extend(delivered)
        raise LostWrite("the relay died before its UPDATE (test)")

    relay.store.mark_confirmed = lost  # type: ignore[method-assign]
    return relay


def test_rows_committed_but_not_confirmed_are_confirmed_from_kafka_not_sent_again(
    dsn, bootstrap, topic, progress_topic
):
    """A relay commits a batch and dies before its UPDATE; the next owner fences it, reads
    the progress records, confirms those rows and sends only the rest."""
    write(dsn, topic, 1200, keys=30)
    cfg = eos_config(dsn, bootstrap, progress_topic, batch_size=400)
    sent: list[Delivered] = []  # what Kafka holds of it
    zombie = dying_before_its_update(cfg, sent)
    assert zombie.step() == 400  # one batch committed in Kafka
    with pytest.raises(LostWrite):
        zombie.settle()  # and its write fails
    assert counts(dsn) == {"PENDING": 1200}
    assert len(sent) == 400
    # Its leases expire (it is paused, or dead).
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE local_message_bucket SET lease_until = now() - interval '1 second'")
        conn.execute("UPDATE local_message_relay SET lease_until = now() - interval '1 second'")

    successor, _ = build_relay(cfg)
    try:
        while successor.run_once():
            pass
        successor.settle()
    finally:
        successor.shutdown()
        successor.sink.close(5)
        successor.close_stores()
    assert recovered(successor) == 400
    verdict = verify(dsn, bootstrap, topic)
    verdict.assert_clean(allow_duplicates=False)
    assert verdict.received == 1200

    # The zombie wakes up: its producers were fenced, so nothing it sends becomes visible.
    row = one_pending_message(dsn, topic, zombie.sink.shards_ready)
    resets = zombie.sink.resets
    [outcome] = zombie.sink.send([row], frozenset(), [])
    assert isinstance(outcome, Failed) and outcome.kind is FailureKind.UNKNOWN, outcome
    assert zombie.sink.resets == resets + 1 and row.bucket // (256 // SHARDS) not in (
        zombie.sink.shards_ready
    )
    zombie.sink.close(1)
    zombie.close_stores()
    assert verify(dsn, bootstrap, topic).received == 1200


def recovered(relay) -> float:
    """Rows the relay confirmed from progress records, as /metrics reports them."""
    value = relay.metrics.registry.get_sample_value("outbox_recovered_from_kafka_total")
    return value or 0.0


def run_until(relay, condition, timeout: float = 90.0) -> None:
    """Run RELAY's loop in a thread until CONDITION holds (or TIMEOUT), then stop it."""
    stop = threading.Event()
    worker = threading.Thread(target=relay.run, args=(stop,))
    worker.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(30)
        relay.sink.close(5)
        relay.close_stores()
    assert not worker.is_alive(), "the relay did not stop"


def one_pending_message(dsn, topic, shards) -> PendingMessage:
    """A copy of a delivered row of one of SHARDS, as the relay would send it again."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT id, message_id::text, topic, key, payload, attempts, created_at, bucket "
            "FROM local_message WHERE topic = %s AND bucket / %s = ANY(%s) ORDER BY id LIMIT 1",
            (topic, 256 // SHARDS, sorted(shards)),
        ).fetchone()
    assert row is not None
    return PendingMessage(row[0], row[1], row[2], row[3], row[4], [], row[5], row[6], row[7])


def test_a_relay_that_gave_up_a_write_confirms_those_rows_from_kafka(
    dsn, bootstrap, topic, progress_topic, monkeypatch
):
    """The same relay gives up writing a committed batch's outcomes (here after one attempt,
    normally twelve): the rows are PENDING but in Kafka. It takes its shards again (its lease
    is in doubt after an error) and confirms them from the progress records instead of
    sending them again."""
    monkeypatch.setattr("relay.relay._WRITE_ATTEMPTS", 1)
    write(dsn, topic, 2000, keys=25)
    cfg = eos_config(dsn, bootstrap, progress_topic, batch_size=300)
    relay, _ = build_relay(cfg)
    real = relay.store.mark_confirmed
    failures = iter([True])

    def flaky(*args, **kwargs):
        if next(failures, False):
            raise LostWrite("connection lost (test)")
        return real(*args, **kwargs)

    relay.store.mark_confirmed = flaky  # type: ignore[method-assign]
    run_until(relay, lambda: counts(dsn).get("CONFIRMED", 0) == 2000)
    assert counts(dsn) == {"CONFIRMED": 2000}
    assert recovered(relay) >= 300
    verdict = verify(dsn, bootstrap, topic)
    verdict.assert_clean(allow_duplicates=False)
    assert verdict.received == 2000


def test_a_poison_message_fails_alone_and_the_shard_goes_on(dsn, bootstrap, progress_topic):
    """A row the topic refuses (over its max.message.bytes) aborts only its own transactions
    (it is sent alone), ends FAILED with the broker's error, and holds back only its key."""
    topic = f"t.{uuid.uuid4().hex[:12]}"
    create_topic(bootstrap, topic, partitions=3, config={"max.message.bytes": "20000"})
    try:
        with psycopg.connect(dsn) as conn, conn.transaction():
            import outbox

            outbox.publish_many(
                conn,
                [dict(topic=topic, key=f"k{i % 10}", payload={"i": i}) for i in range(300)],
            )
            outbox.publish(conn, topic=topic, key="k3", payload=os.urandom(30000))  # no lz4 gain
            outbox.publish(conn, topic=topic, key="k3", payload={"after": 1})
            outbox.publish(conn, topic=topic, key="k4", payload={"after": 2})
        cfg = eos_config(
            dsn, bootstrap, progress_topic, max_attempts=2, backoff_base=0.05, backoff_max=0.1
        )
        relay, _ = build_relay(cfg)
        run_until(
            relay, lambda: counts(dsn).get("FAILED", 0) == 1 and counts(dsn)["CONFIRMED"] == 301
        )
        assert counts(dsn) == {"CONFIRMED": 301, "FAILED": 1, "PENDING": 1}
        with psycopg.connect(dsn) as conn:
            [(error,)] = conn.execute(
                "SELECT last_error FROM local_message WHERE status = 'FAILED'"
            ).fetchall()
        assert "MSG_SIZE_TOO_LARGE" in error
        received = read_all(bootstrap, topic, expected=301)
        ids = {m.header("message_id") for m in received}
        assert len(received) == len(ids) == 301  # each delivered row once, the poison not
    finally:
        delete_topic(bootstrap, topic)


def test_start_is_refused_without_a_usable_progress_topic(dsn, bootstrap, progress_topic):
    missing = eos_config(dsn, bootstrap, f"absent.{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError, match="does not exist: create it with `outbox migrate"):
        check_exactly_once(missing)
    wrong = eos_config(dsn, bootstrap, progress_topic, shards=8)
    with pytest.raises(ConfigError, match="has 4 partitions; the relay runs with 8 shards"):
        check_exactly_once(wrong)
    plain = f"plain.{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, plain, partitions=SHARDS)
    try:
        with pytest.raises(ConfigError, match=r"cleanup\.policy=delete; it must be compact"):
            check_exactly_once(eos_config(dsn, bootstrap, plain))
    finally:
        delete_topic(bootstrap, plain)
    # A transaction timeout (flush_timeout + 6 s) over the broker's transaction.max.timeout.ms
    # (15 minutes by default): init_transactions is refused, and so is the start.
    slow = eos_config(dsn, bootstrap, progress_topic, flush_timeout=1000, lease_seconds=1100)
    with pytest.raises(
        ConfigError, match=r"INVALID_TRANSACTION_TIMEOUT.*transaction\.max\.timeout"
    ):
        check_exactly_once(slow)
    check_exactly_once(eos_config(dsn, bootstrap, progress_topic))  # and a good one passes


def test_the_cli_refuses_with_one_line(dsn, bootstrap):
    from click.testing import CliRunner

    from relay.cli import main

    result = CliRunner().invoke(
        main,
        [
            "relay",
            "--dsn",
            dsn,
            "-b",
            bootstrap,
            "--delivery",
            "exactly-once",
            "--progress-topic",
            f"absent.{uuid.uuid4().hex[:8]}",
            "--once",
        ],
    )
    assert result.exit_code == 2, result.output
    # After the configuration's log line, one line says why.
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [result.output.strip().splitlines()[-1]], result.output
    assert "exactly-once delivery: progress topic" in errors[0], errors


def test_a_progress_topic_from_another_table_confirms_nothing(
    dsn, bootstrap, topic, progress_topic, admin_dsn
):
    """Progress records name rows by id and message_id: a table recreated (or restored from a
    backup, its ids used again) under the same progress topic gets its rows sent, not
    confirmed by records of rows that were sent before."""
    write(dsn, topic, 500, keys=10)
    cfg = eos_config(dsn, bootstrap, progress_topic, batch_size=100)
    first = dying_before_its_update(cfg)
    assert first.step() == 100  # committed with ids 1-100 named, never confirmed
    first.sink.close(1)
    first.close_stores()
    with psycopg.connect(dsn) as conn:  # the table recreated: ids from 1 again
        conn.execute("TRUNCATE local_message RESTART IDENTITY")
        conn.execute("UPDATE local_message_bucket SET owner = NULL, lease_until = NULL")
        conn.execute("DELETE FROM local_message_relay")
    write(dsn, topic, 300, keys=10)
    second, _ = build_relay(cfg)
    run_until(second, lambda: counts(dsn).get("CONFIRMED", 0) == 300)
    assert recovered(second) == 0
    assert counts(dsn) == {"CONFIRMED": 300}
    received = read_all(bootstrap, topic, expected=400)
    assert len(received) == 400  # the first table's 100, then every row of the new one


def test_migrate_creates_the_progress_topic_and_doctor_checks_it(dsn, bootstrap):
    import json

    from click.testing import CliRunner

    from relay.cli import main

    name = f"progress.{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    base = ["-b", bootstrap, "--progress-topic", name]
    try:
        doctor = ["doctor", "--dsn", dsn, "--json", "--delivery", "exactly-once", *base]
        result = runner.invoke(main, doctor)
        assert result.exit_code == 1, result.output
        [finding] = [f for f in json.loads(result.output) if f["check"] == "progress topic"]
        assert finding["level"] == "fail" and "outbox migrate --kafka" in finding["message"]

        result = runner.invoke(main, ["migrate", "--kafka", "--shards", "8", *base])
        assert result.exit_code == 0, result.output
        assert f"progress topic {name}: 8 partitions, compacted (ready)" in result.output
        result = runner.invoke(main, ["migrate", "--kafka", "--shards", "16", *base])
        assert result.exit_code == 1 and "has 8 partitions" in result.output, result.output

        result = runner.invoke(main, [*doctor, "--shards", "8"])
        [finding] = [f for f in json.loads(result.output) if f["check"] == "progress topic"]
        assert finding["level"] == "ok", finding
    finally:
        delete_topic(bootstrap, name)
