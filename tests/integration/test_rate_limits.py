"""Rate limits with the real pair: one token bucket per limit in PostgreSQL, drawn on by every
relay (two relay processes send a limited tenant's rows at the limit between them, not twice
it), rows held back and never dropped, other tenants not slowed, bad limits refused at start."""

import json
import threading
import time

import psycopg

import outbox
from relay.config import parse_rate_limits
from relay.status import read_status
from relay.store import PostgresStore
from tests.integration.test_relay_kafka import drain
from tests.kafka_helpers import read_all
from tests.outbox_command import run
from tests.relay_process import RelayProcess, wait_for

RATE, BURST = 50.0, 50.0
BULK, OTHER = 300, 200


def confirmed(dsn: str, tenant: str) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT count(*) FROM local_message WHERE tenant = %s AND status = 'CONFIRMED'",
            (tenant,),
        ).fetchone()[0]


def test_two_stores_take_from_one_bucket_never_more_than_rate_and_burst(dsn):
    """Two connections (two relays' worth) taking tokens as fast as they can for two seconds:
    what they got in all stays within the burst plus the rate over the time, and the bucket is
    not starved either."""
    limits = parse_rate_limits("tenant:-=200:20")
    stores = [PostgresStore(dsn), PostgresStore(dsn)]
    stores[0].set_rate_limits(limits)
    got = [0, 0]
    errors: list[BaseException] = []
    begun = time.monotonic()
    deadline = begun + 2.0

    def take(n: int) -> None:
        try:
            while time.monotonic() < deadline:
                got[n] += stores[n].take_tokens(limits, [7], [False]).granted[0]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - begun
    for store in stores:
        store.close()
    assert not errors, errors
    assert all(got), got  # both drew on the bucket
    assert sum(got) <= 20 + 200 * elapsed + 1, (got, elapsed)
    assert sum(got) >= 0.5 * 200 * 2.0, (got, elapsed)


def test_two_relays_send_a_limited_tenant_at_the_limit_between_them(
    dsn, bootstrap, topic, tmp_path
):
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish_many(
            conn,
            [
                dict(topic=topic, key=f"b{i % 7}", payload={"i": i}, tenant="bulk")
                for i in range(BULK)
            ],
        )
        outbox.publish_many(
            conn,
            [
                dict(topic=topic, key=f"o{i % 7}", payload={"i": i}, tenant="other")
                for i in range(OTHER)
            ],
        )
    limit = {"OUTBOX_RATE_LIMITS": f"tenant:bulk={RATE:g}:{BURST:g}"}
    relays = [RelayProcess(n, dsn, bootstrap, tmp_path, **limit) for n in ("r1", "r2")]
    try:
        # The other tenant is not held back: all of it while the bulk tenant is throttled.
        wait_for(lambda: confirmed(dsn, "other") == OTHER, 60, "the other tenant's rows")
        assert confirmed(dsn, "bulk") < BULK
        with psycopg.connect(dsn) as conn:
            throttled = wait_for(
                lambda: [
                    limit
                    for limit in read_status(conn, "public")["rate_limits"]
                    if limit["throttled"]
                ],
                30,
                "outbox status to show the limit throttled",
            )
        assert [(t["scope"], t["name"], t["rate"], t["burst"]) for t in throttled] == [
            ("tenant", "bulk", RATE, BURST)
        ]
        wait_for(lambda: confirmed(dsn, "bulk") == BULK, 60, "every bulk row, in the end")
    finally:
        for relay in relays:
            relay.stop()
    records = read_all(bootstrap, topic, expected=BULK + OTHER)
    assert len(records) == BULK + OTHER
    bulk = [r for r in records if r.header("outbox_tenant") == b"bulk"]
    assert len(bulk) == BULK
    # Each key's rows in order, through the throttling and both relays.
    by_key: dict[bytes | None, list[int]] = {}
    for r in sorted(bulk, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(r.key, []).append(json.loads(r.value)["i"])
    assert all(ns == sorted(ns) for ns in by_key.values()), by_key
    # The rate, from the producers' timestamps: the burst at once, then RATE a second between
    # the two relays. Each relay with a bucket of its own sends twice as fast, and fails this.
    stamps = sorted(r.timestamp_ms for r in bulk)
    seconds = (stamps[-1] - stamps[0]) / 1000
    assert (BULK - BURST) / seconds <= RATE * 1.15, (seconds, stamps[:5], stamps[-5:])
    print(f"bulk rate between the two relays: {(BULK - BURST) / seconds:.1f}/s")


def test_a_limit_for_a_tenant_that_never_wrote_is_refused_and_one_that_did_is_not(
    dsn, bootstrap, topic
):
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=topic, key="k", payload={}, tenant="acme")
    env = {"OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap, "OUTBOX_LISTEN": "false"}
    refused = run("relay", "--once", "--rate-limit", "tenant:acmee=10", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "unknown tenant 'acmee'" in refused.stderr
    # One line says it (after the INFO line with the configuration).
    assert [line for line in refused.stderr.splitlines() if "acmee'" in line] == [
        refused.stderr.strip().splitlines()[-1]
    ]
    bad = run("relay", "--once", "--rate-limit", "tenant:acme=-1", env=env)
    assert bad.returncode == 2 and "the rate must be a positive number" in bad.stderr
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM local_message_rate").fetchone()[0] == 0
        assert c.execute("SELECT status FROM local_message").fetchone()[0] == "PENDING"
    ok = run("relay", "--once", "--rate-limit", "tenant:acme=10", env=env)
    assert ok.returncode == 0, ok.stderr
    assert confirmed(dsn, "acme") == 1
    status = run("status", env=env)
    assert "tenant acme: 10/s, burst 10" in status.stdout, status.stdout


def test_the_relay_registers_the_tenants_it_delivers(dsn, bootstrap, topic):
    """Tenants are known while their rows wait, and after: the relay registers each tenant
    whose rows it reads; an operator may register one ahead."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        for tenant in ("a", "b", "a", None):
            outbox.publish(conn, topic=topic, payload={}, tenant=tenant)
    drain(dsn, bootstrap)
    with psycopg.connect(dsn) as c:
        c.execute("INSERT INTO local_message_tenant (tenant) VALUES ('new')")
        registered = {t for (t,) in c.execute("SELECT tenant FROM local_message_tenant")}
        assert (
            c.execute("SELECT count(*) FROM local_message WHERE status = 'PENDING'").fetchone()[0]
            == 0
        )
    assert registered == {"a", "b", "new"}
    store = PostgresStore(dsn)
    try:
        known = store.known_tenants(["a", "b", "new", "zz"])
    finally:
        store.close()
    assert known == {"a", "b", "new"}
