"""The lease rules of PostgresStore, step by step against the real server."""

import uuid

import psycopg

import outbox
from relay.model import Delivered, FailureUpdate
from relay.store import PostgresStore
from tests.relay_process import wait_for


def test_terminal_updates_of_a_relay_that_lost_its_lease_change_nothing(dsn):
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish_many(conn, [dict(topic="t", key=f"k{i}", payload={}) for i in range(50)])
    a, b = PostgresStore(dsn), PostgresStore(dsn)
    relay_a, relay_b = uuid.uuid4(), uuid.uuid4()
    try:
        assert len(a.heartbeat(relay_a, "a", lease_seconds=1.0)) == 256
        in_flight = a.fetch_pending(frozenset(range(256)), 100)
        assert len(in_flight) == 50
        # a is paused past its lease: b takes every bucket over.
        wait_for(
            lambda: len(b.heartbeat(relay_b, "b", lease_seconds=60.0)) == 256,
            10,
            "b acquiring the expired buckets",
        )
        redo = b.fetch_pending(frozenset(range(256)), 100)
        assert [m.id for m in redo] == [m.id for m in in_flight]
        assert (
            b.mark_confirmed(
                relay_b, [Delivered(m.id, 1, 100 + i) for i, m in enumerate(redo[:25])]
            )
            == 25
        )
        # a wakes up and reports its (stale) outcomes: none of them may land.
        assert a.mark_confirmed(relay_a, [Delivered(m.id, 0, 0) for m in in_flight]) == 0
        assert (
            a.record_failures(
                relay_a, [FailureUpdate(m.id, 1, "stale", True, 0.0) for m in in_flight]
            )
            == 0
        )
        with psycopg.connect(dsn) as c:
            rows = c.execute(
                "SELECT status, kafka_partition, attempts FROM local_message ORDER BY id"
            ).fetchall()
        assert rows[:25] == [("CONFIRMED", 1, 0)] * 25
        assert rows[25:] == [("PENDING", None, 0)] * 25
        # a's next heartbeat: b is alive, so a gets nothing until b gives some back.
        assert a.heartbeat(relay_a, "a", lease_seconds=60.0) == frozenset()
    finally:
        a.close()
        b.close()


def test_buckets_rebalance_as_relays_come_and_go(dsn):
    stores = [PostgresStore(dsn) for _ in range(3)]
    ids = sorted(uuid.uuid4() for _ in range(3))
    try:
        assert len(stores[0].heartbeat(ids[0], "0", 60)) == 256
        assert stores[1].heartbeat(ids[1], "1", 60) == frozenset()  # nothing free yet
        assert len(stores[0].heartbeat(ids[0], "0", 60)) == 128  # gives back its surplus
        assert len(stores[1].heartbeat(ids[1], "1", 60)) == 128
        stores[2].heartbeat(ids[2], "2", 60)
        for i in range(3):
            stores[i].heartbeat(ids[i], str(i), 60)
        owned = [stores[i].heartbeat(ids[i], str(i), 60) for i in range(3)]
        assert sorted(len(o) for o in owned) == [85, 85, 86]
        assert not (owned[0] & owned[1]) and not (owned[1] & owned[2]) and not (owned[0] & owned[2])
        stores[2].release(ids[2])  # a clean shutdown
        owned = [stores[i].heartbeat(ids[i], str(i), 60) for i in range(2)]
        assert sorted(len(o) for o in owned) == [128, 128]
    finally:
        for s in stores:
            s.close()
