"""`outbox reconcile` against the real pair: rows delivered by the relay are found intact; rows
edited in the table afterwards, records deleted by retention, aborted records, transaction
markers (missing, unless the topic is compacted) and open transactions are each reported as
what they are, with the exit code a cron job reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from relay.kafka import check_progress_topic
from relay.runner import run_relay
from tests.integration.test_exactly_once import eos_config
from tests.integration.test_relay_kafka import drain
from tests.kafka_helpers import create_topic, delete_topic
from tests.relay_process import counts, write


def reconcile(dsn, bootstrap, *args, timeout=120):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "relay", "reconcile", *args],
        env={**os.environ, "OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    assert "Traceback" not in result.stderr, result.stderr
    return result


def as_json(result) -> dict:
    return json.loads(result.stdout)


def problems_by_id(out: dict) -> dict[int, dict]:
    return {p["id"]: p for p in out["problems"]}


def place(dsn, row_id):
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT kafka_partition, kafka_offset FROM local_message WHERE id = %s", (row_id,)
        ).fetchone()


def test_delivered_rows_are_ok_and_edited_rows_are_named(dsn, bootstrap, topic):
    write(dsn, topic, 900, keys=30)
    drain(dsn, bootstrap)
    assert counts(dsn) == {"CONFIRMED": 900}

    clean = reconcile(dsn, bootstrap, "--json")
    assert clean.returncode == 0, clean.stderr
    out = as_json(clean)
    assert out["checked"] == 900 and out["counts"]["ok"] == 900 and out["problems"] == []

    with psycopg.connect(dsn) as c:
        # 11 and 12: two rows of one partition, 12 pointed at 11's record.
        partition, offset = place(dsn, 11)
        other = c.execute(
            "SELECT id FROM local_message WHERE kafka_partition = %s AND id > 11 "
            "AND key <> (SELECT key FROM local_message WHERE id = 11) ORDER BY id LIMIT 1",
            (partition,),
        ).fetchone()[0]
        c.execute("UPDATE local_message SET payload = 'tampered' WHERE id = 1")
        c.execute("UPDATE local_message SET message_id = gen_random_uuid() WHERE id = 2")
        c.execute("UPDATE local_message SET key = 'another-key' WHERE id = 3")
        c.execute("UPDATE local_message SET kafka_offset = kafka_offset + 1000000 WHERE id = 4")
        c.execute("UPDATE local_message SET kafka_partition = 99 WHERE id = 5")
        c.execute("UPDATE local_message SET kafka_offset = %s WHERE id = %s", (offset, other))
        c.execute(
            "UPDATE local_message SET kafka_partition = NULL, kafka_offset = NULL WHERE id = 6"
        )
    result = reconcile(dsn, bootstrap, "--json")
    assert result.returncode == 1, result.stderr
    out = as_json(result)
    assert out["counts"] == {
        "ok": 893,
        "missing": 2,
        "mismatched": 4,
        "expired": 0,
        "unreadable": 1,
    }
    found = problems_by_id(out)
    assert set(found) == {1, 2, 3, 4, 5, 6, other}
    assert (found[1]["problem"], found[1]["fields"]) == ("mismatched", ["payload"])
    assert (found[2]["problem"], found[2]["fields"]) == ("mismatched", ["message_id"])
    assert (found[3]["problem"], found[3]["fields"]) == ("mismatched", ["key"])
    assert found[other]["problem"] == "mismatched"
    assert found[other]["fields"] == ["message_id", "key", "payload"]
    assert found[4]["problem"] == "missing" and "end" in found[4]["detail"]
    assert found[5]["problem"] == "missing" and "no partition 99" in found[5]["detail"]
    assert found[6]["problem"] == "unreadable" and found[6]["offset"] is None
    assert found[2]["message_id"] != found[1]["message_id"]

    human = reconcile(dsn, bootstrap, "--show", "3")
    assert human.returncode == 1
    lines = human.stdout.splitlines()
    assert lines[0].startswith("reconcile: 900 CONFIRMED rows") and "2 missing" in lines[0]
    assert len(lines) == 1 + 1 + 3 + 1  # summary, header, 3 rows, "... and 4 more"
    assert "4 more problem rows" in lines[-1]


def test_window_topic_key_sample_and_limit_select_the_rows(dsn, bootstrap, topic):
    second = f"t.{uuid.uuid4().hex[:12]}"
    create_topic(bootstrap, second, partitions=2)
    try:
        write(dsn, topic, 300, keys=10)
        write(dsn, second, 200, keys=10, start=300)
        drain(dsn, bootstrap)
        with psycopg.connect(dsn) as c:  # 50 rows delivered three days ago
            c.execute(
                "UPDATE local_message SET delivered_at = now() - interval '3 days' WHERE id <= 50"
            )
        checks = {
            (): 450,
            ("--since", "4d"): 500,
            ("--since", "4d", "--until", "2d"): 50,
            ("--topic", second): 200,
            ("--topic", topic, "--key", "key-3"): 25,  # ids 51-300 with i % 10 == 3
            ("--sample", "37"): 37,
            ("--limit", "10"): 10,
        }
        for args, expected in checks.items():
            out = as_json(reconcile(dsn, bootstrap, "--json", *args))
            assert (args, out["checked"], out["counts"]["ok"]) == (args, expected, expected)
        window = as_json(reconcile(dsn, bootstrap, "--json", "--topic", second, "--sample", "5"))
        assert window["window"]["topic"] == second and window["window"]["sample"] == 5
        assert "since" in window["window"]
    finally:
        delete_topic(bootstrap, second)


def test_records_deleted_by_retention_are_expired_and_exit_3(dsn, bootstrap, topic):
    write(dsn, topic, 300, keys=10)
    drain(dsn, bootstrap)
    with psycopg.connect(dsn) as c:  # the partition holding the most rows
        partition, size = c.execute(
            "SELECT kafka_partition, count(*) FROM local_message GROUP BY 1 ORDER BY 2 DESC"
        ).fetchone()
    assert size > 20
    # What retention does: the partition's log now starts at offset 20.
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.delete_records([TopicPartition(topic, partition, 20)], request_timeout=30)
    for future in futures.values():
        future.result(timeout=30)
    result = reconcile(dsn, bootstrap, "--json")
    assert result.returncode == 3, result.stderr
    out = as_json(result)
    assert out["counts"]["expired"] == 20 and out["counts"]["ok"] == 280
    assert all(
        p["problem"] == "expired" and p["partition"] == partition and p["offset"] < 20
        for p in out["problems"]
    )
    assert "retention" in out["problems"][0]["detail"]


def insert_confirmed(dsn, topic, partition, offset, message_id, key, payload) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute(
            "INSERT INTO local_message (message_id, topic, key, payload, status, delivered_at, "
            "kafka_partition, kafka_offset) VALUES (%s, %s, %s, %s, 'CONFIRMED', now(), %s, %s) "
            "RETURNING id",
            (message_id, topic, key, payload, partition, offset),
        ).fetchone()[0]


def produce_one(producer: Producer, topic: str, key: bytes, value: bytes, message_id) -> int:
    reports = []
    producer.produce(
        topic,
        key=key,
        value=value,
        partition=0,
        headers=[("message_id", str(message_id).encode())],
        on_delivery=lambda err, msg: reports.append((err, msg)),
    )
    producer.flush(30)
    (err, msg), *_ = reports
    assert err is None
    return msg.offset()


@pytest.mark.parametrize("policy", ["delete", "compact"])
def test_aborted_records_markers_and_open_transactions_quickly(dsn, bootstrap, policy):
    """Rows pointed at each kind of offset a read_committed reader skips or cannot reach yet.
    On a topic that is not compacted, an offset without a committed record means the row's
    message is not there for consumers: missing. On a compacted one, compaction may have
    removed it: unreadable."""
    name = f"t.{uuid.uuid4().hex[:12]}"
    create_topic(bootstrap, name, partitions=1, config={"cleanup.policy": policy})
    txn = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"test-{name}"})
    try:
        txn.init_transactions(30)
        rows = {}

        def row(label, offset, mid=None):
            mid = mid or uuid.uuid4()
            rows[label] = insert_confirmed(dsn, name, 0, offset, mid, b"k", label.encode())
            return mid

        mid = uuid.uuid4()
        txn.begin_transaction()
        committed = produce_one(txn, name, b"k", b"committed", mid)
        txn.commit_transaction(30)
        row("committed", committed, mid)
        row("marker", committed + 1)  # the commit marker follows the transaction's record
        mid = uuid.uuid4()
        txn.begin_transaction()
        aborted = produce_one(txn, name, b"k", b"aborted", mid)
        txn.abort_transaction(30)
        row("aborted", aborted, mid)
        txn.begin_transaction()
        still_open = produce_one(txn, name, b"k", b"open", uuid.uuid4())
        row("open", still_open)

        result = reconcile(dsn, bootstrap, "--json", "--topic", name, "--timeout", "30")
        compacted = policy == "compact"
        assert result.returncode == (3 if compacted else 1), result.stdout
        assert result.seconds < 25  # none of them waited for the partition's timeout
        found = {p["id"]: p for p in as_json(result)["problems"]}
        assert rows["committed"] not in found
        for label in ("marker", "aborted"):
            assert found[rows[label]]["problem"] == ("unreadable" if compacted else "missing")
            assert found[rows[label]]["detail"].startswith("no committed record at this offset")
            if compacted:
                assert "compacted" in found[rows[label]]["detail"]
            else:
                assert "an aborted transaction or a control record" in found[rows[label]]["detail"]
        assert found[rows["open"]]["problem"] == "unreadable"
        assert "not committed yet" in found[rows["open"]]["detail"]
        txn.abort_transaction(30)
    finally:
        delete_topic(bootstrap, name)


def test_exactly_once_delivery_reconciles_clean(dsn, bootstrap, topic):
    progress = f"progress.{uuid.uuid4().hex[:12]}"
    assert check_progress_topic({"bootstrap.servers": bootstrap}, progress, 4, create=True) is None
    try:
        write(dsn, topic, 1500, keys=40)
        cfg = eos_config(dsn, bootstrap, progress, batch_size=300)
        assert run_relay(cfg, threading.Event(), until_idle=True) == 0
        assert counts(dsn) == {"CONFIRMED": 1500}
        result = reconcile(dsn, bootstrap, "--json")
        assert result.returncode == 0, result.stderr
        assert as_json(result)["counts"]["ok"] == 1500
    finally:
        delete_topic(bootstrap, progress)


def test_bad_input_gives_one_line_and_the_right_exit(dsn, bootstrap, topic):
    write(dsn, topic, 10, keys=2)
    drain(dsn, bootstrap)
    unreachable = reconcile(dsn, "127.0.0.1:1")
    assert unreachable.returncode == 3 and unreachable.seconds < 20
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert unreachable.stderr.startswith("error: cannot reach Kafka at 127.0.0.1:1")

    password = psycopg.conninfo.conninfo_to_dict(dsn).get("password") or "devpass"
    wrong = psycopg.conninfo.make_conninfo(dsn, password="not-the-" + password)
    for bad_dsn in (wrong, "postgresql://u:s3cret-pw@127.0.0.1:1/x"):
        result = reconcile(bad_dsn, bootstrap)
        assert result.returncode == 3, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith("error: cannot connect")
        assert "s3cret-pw" not in result.stderr and password not in result.stderr

    for args, message in [
        (("--since", "yesterday"), "error: not a time: 'yesterday'"),
        (("--until", "5q"), "error: not a time: '5q'"),
        (("--sample", "0"), "error: --sample must be at least 1"),
        (("--limit", "-3"), "error: --limit must be at least 1"),
        (("--sample", "3", "--limit", "3"), "error: give --sample or --limit, not both"),
        (("--key", "a", "--key-hex", "61"), "error: give --key or --key-hex, not both"),
        (("--timeout", "0"), "error: --timeout must be between"),
    ]:
        result = reconcile(dsn, bootstrap, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
    # A setting librdkafka refuses: the configuration's fault (exit 2), one line, no secret.
    for args in (
        ("-X", "security.protocol=bogus"),
        ("-X", "security.protocol=ssl", "-X", "ssl.ca.location=/nonexistent"),
        ("-X", "sasl.password=s3cret-kafka-pw", "-X", "security.protocol=s3cret-kafka-pw"),
    ):
        result = reconcile(dsn, bootstrap, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: invalid configuration: Kafka settings refused")
        assert "s3cret-kafka-pw" not in result.stdout + result.stderr
    nothing = reconcile(dsn, bootstrap, "--topic", "no.such.topic")
    assert nothing.returncode == 0 and "reconcile: 0 CONFIRMED rows" in nothing.stdout


def test_help_states_the_exit_codes():
    result = subprocess.run(
        [sys.executable, "-m", "relay", "reconcile", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    for line in ("0  every row", "1  a row is missing or mismatched", "2  usage", "3  could not"):
        assert line in result.stdout


def test_pages_walk_the_id_range_once_with_the_filter_in_sql(dsn):
    """The window's rows come back once each, in id order, across pages cut by the row limit
    and by the span of ids, over gaps in the ids; a sample and the latest are the window's."""
    import datetime as dt

    from relay.reconcile_rows import RowPages, Window

    write(dsn, "pages.a", 120, keys=7)
    write(dsn, "pages.b", 60, keys=7, start=120)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM local_message WHERE id BETWEEN 40 AND 79")  # a gap of 40 ids
        c.execute(
            "UPDATE local_message SET status = 'CONFIRMED', kafka_partition = 0, "
            "kafka_offset = id, delivered_at = now() - make_interval(mins => id::int) "
            "WHERE id % 3 <> 0"
        )
        confirmed = [
            r[0]
            for r in c.execute(
                "SELECT id FROM local_message WHERE status = 'CONFIRMED' AND topic = 'pages.a' "
                "AND delivered_at >= now() - interval '100 minutes' ORDER BY id"
            )
        ]
        assert len(confirmed) > 30

        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=100)
        window = Window(since=since, topic="pages.a")
        pages = RowPages(c, "public", window, page=7, span=11)
        seen = list(pages.rows(pages.pages()))
        assert [r.id for r in seen] == confirmed
        assert pages.position == pages.total
        assert all(r.topic == "pages.a" and len(r.digest) == 32 for r in seen)
        assert seen[0].message_id == str(
            c.execute(
                "SELECT message_id FROM local_message WHERE id = %s", (seen[0].id,)
            ).fetchone()[0]
        )

        sample = RowPages(c, "public", Window(since=since, topic="pages.a", sample=9), page=4)
        picked = [r.id for r in sample.rows(sample.pages())]
        assert len(set(picked)) == 9 and set(picked) <= set(confirmed) and sample.total == 9

        latest = RowPages(c, "public", Window(since=since, topic="pages.a", limit=5), page=2)
        # delivered_at falls as id grows: the latest delivered are the lowest ids.
        assert sorted(r.id for r in latest.rows(latest.pages())) == confirmed[:5]

        empty = RowPages(c, "public", Window(since=since, topic="no.such.topic"), page=7)
        assert list(empty.rows(empty.pages())) == []
