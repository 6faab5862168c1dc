"""Many tenants on one outbox, with the real pair: a tenant's backlog does not hold another
tenant's new events back, and each tenant's keys keep their order."""

import json
import threading

import psycopg

import outbox
from relay.runner import build_relay
from tests.integration.test_relay_kafka import drain, relay_config
from tests.kafka_helpers import read_all
from tests.relay_process import wait_for

BATCH = 500
BACKLOG = 40_000


def _fill(dsn: str, topic: str, tenant: str, rows: int) -> None:
    """ROWS events of TENANT over 50 keys, written by SQL for speed (the writer's checks are
    not what this is about); 64-byte payloads."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO local_message (topic, key, payload, tenant) "
            "SELECT %s, convert_to('k' || (i %% 50), 'UTF8'), "
            "convert_to(lpad(i::text, 64, '0'), 'UTF8'), %s FROM generate_series(1, %s) AS i",
            (topic, tenant, rows),
        )


def test_a_small_tenants_new_events_do_not_wait_for_a_large_tenants_backlog(dsn, bootstrap, topic):
    _fill(dsn, topic, "big", BACKLOG)
    cfg = relay_config(dsn, bootstrap, batch_size=BATCH)
    relay, listener = build_relay(cfg)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as c:

            def confirmed(tenant: str) -> int:
                return c.execute(
                    "SELECT count(*) FROM local_message WHERE tenant = %s AND status = 'CONFIRMED'",
                    (tenant,),
                ).fetchone()[0]

            # The relay is in the middle of the backlog when the small tenant writes.
            wait_for(lambda: confirmed("big") >= 2 * BATCH, 60, "the backlog's first batches")
            with psycopg.connect(dsn) as conn:
                with conn.transaction():
                    small = [
                        outbox.publish(conn, topic=topic, key=f"s{i}", payload={"i": i}, tenant="s")
                        for i in range(5)
                    ]
                (written_at,) = conn.execute("SELECT now()").fetchone()
            wait_for(lambda: confirmed("s") == 5, 60, "the small tenant's events")
            # Rows of the backlog confirmed after the small tenant's commit and before its
            # events: the batch in flight, the one read ahead, and the small events' own
            # batch at most; without the fair read, the whole rest of the backlog.
            (overtook,) = c.execute(
                "SELECT count(*) FROM local_message WHERE tenant = 'big' AND delivered_at > %s "
                "AND delivered_at < (SELECT min(delivered_at) FROM local_message "
                "WHERE tenant = 's')",
                (written_at,),
            ).fetchone()
            left = BACKLOG - confirmed("big")
    finally:
        stop.set()
        thread.join(60)
        relay.sink.close(5)
        relay.close_stores()
        if listener:
            listener.close()
    assert not thread.is_alive()
    assert overtook <= 3 * BATCH, overtook
    # The measure means something only while the backlog was still there.
    assert left > 4 * BATCH, f"the backlog was almost drained ({left} rows left)"
    with psycopg.connect(dsn) as c:
        (delivered,) = c.execute(
            "SELECT count(*) FROM local_message WHERE status = 'CONFIRMED'"
        ).fetchone()
    received = {r.header("message_id") for r in read_all(bootstrap, topic, expected=delivered)}
    assert {str(p.message_id).encode() for p in small} <= received


def test_each_tenants_keys_keep_their_order_and_a_failure_holds_only_its_tenant(
    dsn, bootstrap, topic
):
    """Two tenants write the same keys, interleaved; one tenant's first row goes to a topic
    that does not exist: it fails for good and holds that tenant's later rows of the key, and
    nothing of the other tenant's. Each record names its tenant in a header."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=topic + ".missing", key="k0", payload={"n": -1}, tenant="a")
        for n in range(200):
            for tenant in ("a", "b"):
                outbox.publish(conn, topic=topic, key=f"k{n % 4}", payload={"n": n}, tenant=tenant)
    drain(dsn, bootstrap, max_attempts=1, batch_size=64)
    with psycopg.connect(dsn) as c:
        counts = dict(
            c.execute(
                "SELECT tenant || ':' || status, count(*) FROM local_message GROUP BY 1"
            ).fetchall()
        )
    # Tenant a: the failed row, and its 50 later rows of k0 held; b: everything delivered.
    assert counts == {"a:FAILED": 1, "a:PENDING": 50, "a:CONFIRMED": 150, "b:CONFIRMED": 200}
    with psycopg.connect(dsn) as c:
        tenant_of = dict(c.execute("SELECT message_id::text, tenant FROM local_message"))
    records = read_all(bootstrap, topic, expected=350)
    assert len(records) == 350
    seen: dict[tuple[str, bytes | None], list[int]] = {}
    for r in records:  # in offset order within each partition; a key is in one partition
        tenant = tenant_of[r.header("message_id").decode()]
        # Consumers tell two tenants' rows of one key apart by the header the relay adds.
        assert r.header("outbox_tenant") == tenant.encode()
        seen.setdefault((tenant, r.key), []).append(json.loads(r.value)["n"])
    assert all(ns == sorted(ns) for ns in seen.values()), seen
    assert len(seen[("b", b"k0")]) == 50 and len(seen[("a", b"k1")]) == 50
