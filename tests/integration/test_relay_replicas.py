"""The relay daemon as real processes against the real pair: replicas, SIGKILL, SIGSTOP past the
lease, SIGTERM while busy. Every test ends with the independent verifier."""

import signal
import threading
import time

import psycopg

from tests.relay_process import all_confirmed, counts, wait_for, write
from tests.verify import verify


def test_three_replicas_deliver_10k_messages_over_100_keys_in_order(dsn, bootstrap, topic, relays):
    procs = [relays(f"r{i}") for i in range(3)]

    def shares():
        with psycopg.connect(dsn) as c:
            return c.execute(
                "SELECT r.name, count(b.bucket) FROM local_message_relay r "
                "LEFT JOIN local_message_bucket b ON b.owner = r.relay_id "
                "GROUP BY r.name"
            ).fetchall()

    wait_for(
        lambda: len(shares()) == 3 and all(n >= 80 for _, n in shares()),
        30,
        "three relays sharing the buckets",
    )
    writer = threading.Thread(target=write, args=(dsn, topic, 10_000, 100))
    writer.start()
    writer.join(120)
    wait_for(lambda: all_confirmed(dsn, 10_000), 120, "10,000 rows CONFIRMED")
    with psycopg.connect(dsn) as c:
        owners = c.execute("SELECT count(DISTINCT owner) FROM local_message_bucket").fetchone()
        overlap = c.execute(
            "SELECT count(*) FROM (SELECT bucket FROM local_message_bucket "
            "GROUP BY bucket HAVING count(DISTINCT owner) > 1) x"
        ).fetchone()
    assert owners == (3,) and overlap == (0,)
    verdict = verify(dsn, bootstrap, topic)
    verdict.assert_clean()
    assert verdict.received - verdict.duplicates == 10_000
    for p in procs:
        assert p.stop() == 0
    delivered = [int(p.log().rsplit("stopped: ", 1)[1].split()[0]) for p in procs]
    assert sum(delivered) >= 10_000 and all(n > 0 for n in delivered), delivered


def test_relay_killed_mid_batch_loses_nothing_and_its_buckets_are_taken_over(
    dsn, bootstrap, topic, relays
):
    write(dsn, topic, 30_000, 50, per_tx=1000)
    first = relays("victim", OUTBOX_BATCH_SIZE="500")
    wait_for(lambda: counts(dsn).get("CONFIRMED", 0) >= 2000, 60, "the victim delivering")
    first.kill()  # SIGKILL: no release, no drain
    assert counts(dsn).get("PENDING", 0) > 0, "killed before the end"
    second = relays("heir")
    wait_for(lambda: all_confirmed(dsn, 30_000), 120, "the heir delivering everything")
    assert "owns 256 buckets" in second.log()
    verify(dsn, bootstrap, topic).assert_clean()
    assert second.stop() == 0


def test_relay_paused_past_its_lease_cannot_overwrite_the_new_owner(dsn, bootstrap, topic, relays):
    write(dsn, topic, 20_000, 50, per_tx=1000)
    paused = relays("paused", OUTBOX_BATCH_SIZE="1000")
    wait_for(lambda: counts(dsn).get("CONFIRMED", 0) >= 1000, 60, "the first relay delivering")
    paused.signal(signal.SIGSTOP)
    other = relays("other")
    # The other relay takes the buckets only once the paused one's lease expired (10 s).
    wait_for(lambda: "owns 256 buckets" in other.log(), 40, "the takeover")
    wait_for(lambda: all_confirmed(dsn, 20_000), 120, "everything delivered by the other")
    with psycopg.connect(dsn) as c:
        before = c.execute(
            "SELECT id, kafka_partition, kafka_offset, delivered_at FROM local_message ORDER BY id"
        ).fetchall()
    paused.signal(signal.SIGCONT)
    # The resumed relay finishes its batch, finds its confirms refused, and rejoins.
    wait_for(
        lambda: paused.log().count("relay paused owns") >= 2,
        60,
        "the resumed relay's next heartbeat",
    )
    with psycopg.connect(dsn) as c:
        after = c.execute(
            "SELECT id, kafka_partition, kafka_offset, delivered_at FROM local_message ORDER BY id"
        ).fetchall()
    assert after == before, "a relay that lost its lease overwrote rows"
    verify(dsn, bootstrap, topic).assert_clean()
    assert paused.stop() == 0 and other.stop() == 0


def test_sigterm_while_busy_drains_and_exits_0(dsn, bootstrap, topic, relays):
    write(dsn, topic, 30_000, 100, per_tx=1000)
    relay = relays("busy", OUTBOX_BATCH_SIZE="2000")
    wait_for(lambda: counts(dsn).get("CONFIRMED", 0) >= 2000, 60, "delivering")
    started = time.monotonic()
    assert relay.stop(timeout=30) == 0
    assert time.monotonic() - started < 30
    log = relay.log()
    assert "SIGTERM: draining and stopping" in log
    stopped_with = int(log.rsplit("stopped: ", 1)[1].split()[0])
    c = counts(dsn)
    assert c.get("CONFIRMED", 0) == stopped_with, "every delivery it made is recorded"
    assert set(c) <= {"CONFIRMED", "PENDING"}
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM local_message_bucket WHERE owner IS NOT NULL"
        ).fetchone() == (0,), "leases released"
    # Nothing in Kafka that the table does not count as delivered.
    with psycopg.connect(dsn) as conn:
        confirmed = {
            r[0]
            for r in conn.execute(
                "SELECT message_id::text FROM local_message WHERE status = 'CONFIRMED'"
            )
        }
    from tests.kafka_helpers import read_all

    in_kafka = {
        m.header("message_id").decode() for m in read_all(bootstrap, topic, expected=len(confirmed))
    }
    assert in_kafka == confirmed
    relays("again")
    wait_for(lambda: all_confirmed(dsn, 30_000), 120, "a new relay finishing the job")
    verify(dsn, bootstrap, topic).assert_clean()
