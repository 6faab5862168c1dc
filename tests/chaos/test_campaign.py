"""The reliability campaign: writers commit while relays are killed, paused and raced, the
broker and PostgreSQL restart; then an independent verifier reads Kafka from the beginning.

    scripts/test tests/chaos                       # the bounded CI run (>= 10,000 messages)
    CHAOS_SOAK=1 scripts/test tests/chaos -s       # the soak: >= 100,000 messages
    CHAOS_SEED=1234 scripts/test tests/chaos -s    # replay a run's fault schedule
    CHAOS_DELIVERY=exactly-once scripts/test tests/chaos -s   # one delivery mode only

It runs once per delivery mode. At least once, the verifier allows duplicates (the documented
cases); exactly once, it reads with read_committed and allows none. The seed is printed at the
start; a failing run is replayed with it.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

import psycopg
import pytest

import outbox
from relay.kafka import check_progress_topic
from tests.kafka_helpers import check_kafka, create_topic, delete_topic
from tests.relay_process import RelayProcess, wait_for
from tests.service_control import kill_broker, services
from tests.verify import verify

#: It stops, kills and restarts PostgreSQL and Kafka: the `services` tier.
pytestmark = pytest.mark.services

SOAK = os.environ.get("CHAOS_SOAK") == "1"
MESSAGES = 100_000 if SOAK else 10_000
KEYS = 500 if SOAK else 200
WRITERS = 4
DURATION = 900 if SOAK else 150  # seconds of writing, faults spread over it


class Writers:
    """WRITERS threads committing MESSAGES events at an even pace over DURATION seconds. Each
    writer owns KEYS/WRITERS keys and writes them in order with lock_key; a batch whose commit
    failed (PostgreSQL restarting) is retried with the same dedup keys, so nothing is written
    twice and nothing is lost."""

    def __init__(self, dsn: str, topic: str):
        self.dsn, self.topic = dsn, topic
        self.errors = 0
        self.written = 0
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(WRITERS)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "writers did not finish"

    def _run(self, w: int) -> None:
        per_writer = MESSAGES // WRITERS
        batch = 10
        interval = DURATION / (per_writer / batch)
        keys = [f"key-{k}" for k in range(KEYS) if k % WRITERS == w]
        start = time.monotonic()
        seq = 0
        conn = None
        while seq < per_writer:
            messages = [
                dict(
                    topic=self.topic,
                    key=keys[(seq + j) % len(keys)],
                    payload={"w": w, "seq": seq + j},
                    dedup_key=f"w{w}-{seq + j}",
                    tenant=tenant_of(keys[(seq + j) % len(keys)]),
                    # One event in 40 scheduled 1-5 s ahead: promoted under the same faults.
                    delay=1 + (seq + j) % 5 if (seq + j) % 40 == 7 else None,
                )
                for j in range(min(batch, per_writer - seq))
            ]
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, connect_timeout=5)
                with conn.transaction():
                    outbox.publish_many(conn, messages, lock_key=True)
                seq += len(messages)
                with self._lock:
                    self.written += len(messages)
            except psycopg.Error:
                with self._lock:
                    self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.5)  # PostgreSQL is restarting: back off, then retry the batch
                continue
            pause = start + (seq / batch) * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        if conn is not None:
            conn.close()


UNSEEN_ROWS = 12  # rows on a topic no relay has seen, between two rows of one key


def tenant_of(key: str) -> str:
    """Three tenants, the writers' keys split among them (a key is one writer's): the relay's
    fair read takes turns across them under the same faults. A key's order is kept per tenant,
    so every row of a key, the faults' too, carries its key's tenant."""
    writer = int(key.rsplit("-", 1)[1]) % WRITERS
    return f"tenant-{writer % 3}"


def kill_broker_and_commit_across_an_unseen_topic(
    dsn: str, topic: str, unseen: str, key: str
) -> None:
    """The pattern that once broke order: the broker dies (kill -9); one transaction commits
    a row of KEY on TOPIC, UNSEEN_ROWS rows on a topic no relay has looked up yet, and a second
    row of KEY; the caller brings the broker back a little later."""
    kill_broker()
    for _ in range(30):  # PostgreSQL may be restarting too: retry, bounded
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn, conn.transaction():
                outbox.publish(
                    conn,
                    topic=topic,
                    key=key,
                    payload={"unseen": unseen, "m": "a"},
                    dedup_key=f"{unseen}-a",
                    tenant=tenant_of(key),
                    lock_key=True,
                )
                outbox.publish_many(
                    conn,
                    [
                        dict(topic=unseen, key=f"u{i}", payload={"u": i}, dedup_key=f"{unseen}-{i}")
                        for i in range(UNSEEN_ROWS)
                    ],
                )
                outbox.publish(
                    conn,
                    topic=topic,
                    key=key,
                    payload={"unseen": unseen, "m": "b"},
                    dedup_key=f"{unseen}-b",
                    tenant=tenant_of(key),
                    lock_key=True,
                )
            return
        except psycopg.Error:
            time.sleep(1)
    raise AssertionError("could not commit the unseen-topic transaction")


MODES = [m for m in ("at-least-once", "exactly-once") if os.environ.get("CHAOS_DELIVERY", m) == m]


def confirmed(dsn: str) -> int:
    for _ in range(30):  # PostgreSQL may be restarting: retry, bounded
        try:
            with psycopg.connect(dsn, connect_timeout=5) as c:
                row = c.execute(
                    "SELECT count(*) FROM local_message WHERE status = 'CONFIRMED'"
                ).fetchone()
                return row[0] if row else 0
        except psycopg.Error:
            time.sleep(1)
    raise AssertionError("PostgreSQL did not answer")


def recovered(relays: dict[str, RelayProcess]) -> int:
    """Rows the relays confirmed from Kafka's progress records (exactly-once: a relay killed
    between a transaction's commit and its UPDATE), from their logs."""
    found = re.findall(
        r"confirmed (\d+) rows found in Kafka's progress records",
        "".join(r.log() for r in relays.values()),
    )
    return sum(map(int, found))


@pytest.mark.parametrize("delivery", MODES)
def test_campaign(dsn, bootstrap, topic, tmp_path, delivery):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1_000_000)))
    print(
        f"\nchaos campaign seed {seed}: CHAOS_SEED={seed} replays it "
        f"({delivery}, {MESSAGES} messages, {KEYS} keys, {DURATION}s)"
    )
    rng = random.Random(seed)
    relays: dict[str, RelayProcess] = {}
    counter = iter(range(10_000))
    faults: list[str] = []
    # One tenant under a rate limit shared by the relays: half as much again as it writes on
    # average, so that the backlogs the faults leave drain throttled, held back and resumed
    # through the kills (tenant_of: tenant-0 is two writers of four).
    limit = f"tenant:tenant-0={1.5 * MESSAGES / DURATION / 2:.0f}:100"
    mode = {"OUTBOX_DELIVERY": delivery, "OUTBOX_RATE_LIMITS": limit}
    with psycopg.connect(dsn) as c:  # limited before its first event (docs/configuration.md)
        c.execute("INSERT INTO local_message_tenant (tenant) VALUES ('tenant-0')")
    if delivery == "exactly-once":
        progress = f"{topic}.progress"
        assert (
            check_progress_topic({"bootstrap.servers": bootstrap}, progress, 4, create=True) is None
        )
        mode.update(
            OUTBOX_PROGRESS_TOPIC=progress,
            OUTBOX_TRANSACTIONAL_ID_PREFIX=f"chaos-{topic}",
            # Smaller batches: more transactions, and a drain of several pipelined batches
            # for the drain-kill fault to land in.
            OUTBOX_BATCH_SIZE="100",
        )

    def spawn() -> None:
        name = f"r{next(counter)}"
        relays[name] = RelayProcess(name, dsn, bootstrap, tmp_path, **mode)

    def living() -> list[RelayProcess]:
        return [r for r in relays.values() if r.alive()]

    for _ in range(3):
        spawn()
    writers = Writers(dsn, topic)
    writers.start()
    # The fault schedule: at least 10 kills, one broker restart, one PostgreSQL restart, one
    # relay paused past its lease; the relay count moves between 1 and 3.
    # Plus the broker killed while a transaction spans a topic no relay has seen, and every
    # relay killed while it drains a backlog: batches committed (or acknowledged) whose
    # UPDATE has not run yet, the window exactly-once recovery exists for.
    plan = ["kill"] * (40 if SOAK else 10) + [
        "kafka",
        "pg",
        "pause",
        "kafka-unseen",
        "drain-kill",
        "drain-kill",
    ] * (3 if SOAK else 1)
    rng.shuffle(plan)
    unseen = [f"{topic}.unseen{i}" for i in range(plan.count("kafka-unseen"))]
    for name in unseen:
        create_topic(bootstrap, name, partitions=3)
    extra_rows = 0
    step = DURATION / (len(plan) + 1)
    started = time.monotonic()
    try:
        for i, fault in enumerate(plan):
            at = started + step * (i + 1) + rng.uniform(-step / 3, step / 3)
            time.sleep(max(0.0, at - time.monotonic()))
            alive = living()
            if fault == "kill" and alive:
                victim = rng.choice(alive)
                victim.kill()
                faults.append(f"{time.monotonic() - started:.0f}s SIGKILL {victim.name}")
            elif fault == "kafka":
                services("down", "kafka")
                time.sleep(rng.uniform(5, 15))
                services("up", "kafka")
                faults.append(f"{time.monotonic() - started:.0f}s broker restarted")
            elif fault == "kafka-unseen":
                name = unseen[len([f for f in faults if "unseen" in f])]
                kill_broker_and_commit_across_an_unseen_topic(
                    dsn, topic, name, f"key-{rng.randrange(KEYS)}"
                )
                extra_rows += UNSEEN_ROWS + 2
                time.sleep(rng.uniform(3, 12))
                services("up", "kafka")
                faults.append(
                    f"{time.monotonic() - started:.0f}s broker killed, unseen topic "
                    f"{name} committed, broker back"
                )
            elif fault == "pg":
                services("restart", "pg")
                faults.append(f"{time.monotonic() - started:.0f}s PostgreSQL restarted (fast)")
            elif fault == "drain-kill" and alive:
                for r in alive:
                    r.signal(signal.SIGSTOP)
                time.sleep(8)  # a backlog builds up (below the 12 s lease)
                before = confirmed(dsn)
                for r in alive:
                    r.signal(signal.SIGCONT)
                # Killed as the first batches of the drain are written, the next ones in flight.
                wait_for(lambda b=before: confirmed(dsn) > b, 30, "the drain", interval=0.01)
                time.sleep(rng.uniform(0.0, 0.05))
                for r in alive:
                    r.kill()
                faults.append(
                    f"{time.monotonic() - started:.0f}s SIGKILL of all relays while draining "
                    f"({', '.join(r.name for r in alive)})"
                )
            elif fault == "pause" and alive:
                victim = rng.choice(alive)
                victim.signal(signal.SIGSTOP)
                time.sleep(12 + rng.uniform(0, 5))  # past its 10 s lease
                victim.signal(signal.SIGCONT)
                faults.append(f"{time.monotonic() - started:.0f}s SIGSTOP/SIGCONT {victim.name}")
            while len(living()) < rng.randint(1, 3):
                spawn()
        writers.join(DURATION + 300)
    finally:
        services("up")  # whatever happened, the services are up again
    print("faults:", *faults, sep="\n  ")
    wait_for(lambda: check_kafka(bootstrap) is None, 60, "the broker")
    if not living():
        spawn()

    def all_confirmed() -> bool:
        with psycopg.connect(dsn) as c:
            return c.execute(
                "SELECT count(*) FILTER (WHERE status <> 'CONFIRMED'), count(*) FROM local_message"
            ).fetchone() == (0, MESSAGES + extra_rows)

    wait_for(all_confirmed, 300, "every row CONFIRMED after the faults stopped", interval=1)
    for r in living():
        r.wait_started()  # one spawned just before the end may still be importing
        assert r.stop() == 0, r.log()[-2000:]
    verdict = verify(dsn, bootstrap, topic, timeout=120)
    with psycopg.connect(dsn) as c:
        (held_at,) = c.execute(
            "SELECT held_at FROM local_message_rate WHERE name = 'tenant-0'"
        ).fetchone()
    with psycopg.connect(dsn) as c:
        (scheduled,) = c.execute(
            "SELECT count(*) FROM local_message WHERE deliver_at > created_at"
        ).fetchone()
    print(f"rate limit {limit}: last held rows back at {held_at}; scheduled rows {scheduled}")
    # The limit was at work: the faults' backlogs drained under it; and rows were scheduled.
    assert held_at is not None and scheduled > 0
    print(
        f"verdict: rows {verdict.rows}, received {verdict.received}, missing "
        f"{len(verdict.missing)}, duplicates {verdict.duplicates}, inversions "
        f"{len(verdict.inversions)}, not confirmed {verdict.not_confirmed}, writer retries "
        f"{writers.errors}, rows confirmed from progress records {recovered(relays)}"
    )
    assert writers.written == MESSAGES
    assert sum(f.startswith(tuple("0123456789")) and "SIGKILL" in f for f in faults) >= 10
    assert extra_rows == len(unseen) * (UNSEEN_ROWS + 2)
    exactly_once = delivery == "exactly-once"
    verdict.assert_clean(allow_duplicates=not exactly_once)
    for name in unseen:
        other = verify(dsn, bootstrap, name, timeout=60)
        assert other.rows == UNSEEN_ROWS
        other.assert_clean(allow_duplicates=not exactly_once)
        delete_topic(bootstrap, name)
    if exactly_once:
        delete_topic(bootstrap, progress)
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM local_message WHERE attempts > 0").fetchone() == (
            0,
        ), "no fault of this campaign is the messages' fault"
