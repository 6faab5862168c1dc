"""The Store contract (relay.model.Store), held by PostgresStore against the real database and
by the InMemoryStore the loop's unit tests use: leases, the read, head-of-key blocking, the
owner-only outcome writes, the gauges and retention behave the same in both."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pytest

import outbox
from relay.model import BUCKETS, Delivered, FailureUpdate, PendingStats, Store
from relay.shards import message_tag, whole_shards
from relay.testing import InMemoryStore, bucket_of

ALL = frozenset(range(BUCKETS))


@dataclass
class StoreUnderTest:
    store: Store
    #: Commit one event (key, and optionally topic= and tenant=); returns its row id.
    insert: Callable[..., int]
    #: A row's (status, last_error).
    row: Callable[[int], tuple[str, str | None]]
    #: Commit one event of KEY scheduled DELAY seconds ahead; returns its row id.
    schedule: Callable[[bytes, float], int]
    #: Move a scheduled row's due time into the past (a second ago).
    make_due: Callable[[int], None]


def _postgres(dsn: str, shards: int = BUCKETS) -> Iterator[StoreUnderTest]:
    from relay.store import PostgresStore

    store = PostgresStore(dsn, shards=shards)

    def insert(key: bytes | None, topic: str = "t", tenant: str | None = None) -> int:
        with psycopg.connect(dsn) as conn, conn.transaction():
            return outbox.publish(conn, topic=topic, key=key, payload={}, tenant=tenant).id

    def row(row_id: int) -> tuple[str, str | None]:
        with psycopg.connect(dsn) as conn:
            return conn.execute(
                "SELECT status, last_error FROM local_message WHERE id = %s", (row_id,)
            ).fetchone()

    def schedule(key: bytes, delay: float) -> int:
        with psycopg.connect(dsn) as conn, conn.transaction():
            return outbox.publish(conn, topic="t", key=key, payload={}, delay=delay).id

    def make_due(row_id: int) -> None:
        with psycopg.connect(dsn) as conn, conn.transaction():
            conn.execute(
                "UPDATE local_message SET deliver_at = now() - interval '1 second' WHERE id = %s",
                (row_id,),
            )

    try:
        yield StoreUnderTest(store, insert, row, schedule, make_due)
    finally:
        store.close()


def _in_memory(shards: int = BUCKETS) -> Iterator[StoreUnderTest]:
    store = InMemoryStore(time.monotonic, shards=shards)

    def make_due(row_id: int) -> None:
        store.rows[row_id].deliver_at = time.monotonic() - 1

    yield StoreUnderTest(
        store,
        lambda key, topic="t", tenant=None: store.insert(topic, key, b"{}", tenant=tenant or "").id,
        lambda row_id: (store.rows[row_id].status, store.rows[row_id].last_error),
        lambda key, delay: store.insert("t", key, b"{}", deliver_at=time.monotonic() + delay).id,
        make_due,
    )


@pytest.fixture(params=["postgres", "in-memory"])
def under_test(request) -> Iterator[StoreUnderTest]:
    if request.param == "postgres":
        yield from _postgres(request.getfixturevalue("dsn"))
    else:
        yield from _in_memory()


@pytest.fixture(params=["postgres", "in-memory"])
def sharded(request) -> Iterator[StoreUnderTest]:
    """The store leasing in 16 shards (exactly-once delivery)."""
    if request.param == "postgres":
        yield from _postgres(request.getfixturevalue("dsn"), shards=16)
    else:
        yield from _in_memory(shards=16)


def ids(messages) -> list[int]:
    return [m.id for m in messages]


def test_relays_share_the_buckets_and_a_released_relay_leaves_them_all(under_test):
    store = under_test.store
    first, second = sorted([uuid.uuid4(), uuid.uuid4()], key=lambda u: u.int)
    assert store.heartbeat(first, "a", 60) == ALL
    assert store.heartbeat(second, "b", 60) == frozenset()  # all leased: nothing free yet
    kept = store.heartbeat(first, "a", 60)  # gives back what is above its fair share
    taken = store.heartbeat(second, "b", 60)
    assert len(kept) == len(taken) == BUCKETS // 2 and not kept & taken
    store.release(first)
    assert store.heartbeat(second, "b", 60) == ALL


def test_the_read_is_in_id_order_within_its_limit_buckets_and_exclusions(under_test):
    store, insert = under_test.store, under_test.insert
    rows = [insert(b"k%d" % i) for i in range(6)]
    store.heartbeat(uuid.uuid4(), "a", 60)
    assert ids(store.fetch_pending(ALL, 4)) == rows[:4]
    assert ids(store.fetch_pending(ALL, 10, exclude=rows[:2])) == rows[2:]
    one = frozenset({bucket_of(b"k3", rows[3])})
    assert ids(store.fetch_pending(one, 10)) == [
        r for i, r in enumerate(rows) if bucket_of(b"k%d" % i, r) in one
    ]


def test_a_failed_or_waiting_row_holds_back_its_key_and_no_other(under_test):
    store, insert = under_test.store, under_test.insert
    relay = uuid.uuid4()
    store.heartbeat(relay, "a", 60)
    a1, b1, c1, a2, b2, c2 = (insert(k) for k in (b"a", b"b", b"c", b"a", b"b", b"c"))
    assert (
        store.record_failures(
            relay,
            [
                FailureUpdate(a1, 1, "rejected", True, 0.0),  # FAILED
                FailureUpdate(b1, 1, "try again", False, 300.0),  # waits five minutes for its retry
            ],
        )
        == 2
    )
    assert ids(store.fetch_pending(ALL, 10)) == [c1, c2]
    stats = store.pending_stats(ALL).total()
    # a2 and b2 are held back but still PENDING; the FAILED a1 is not pending any more.
    assert (stats.pending, stats.held) == (5, 2)
    assert stats.lag_seconds is not None and stats.lag_seconds >= 0
    assert a2 not in ids(store.fetch_pending(ALL, 10)) and b2 not in ids(
        store.fetch_pending(ALL, 10)
    )


def test_rows_held_behind_a_blocked_key_are_not_lag(under_test):
    """The lag counts rows the relay may send now: one poisoned key must not look like a relay
    falling behind (it shows as a blocked key instead)."""
    store, insert = under_test.store, under_test.insert
    relay = uuid.uuid4()
    store.heartbeat(relay, "a", 60)
    first, *_held = (insert(b"poisoned") for _ in range(3))
    store.record_failures(relay, [FailureUpdate(first, 1, "rejected", True, 0.0)])
    assert store.pending_stats(ALL).total() == PendingStats(2, 2, None)
    waits = insert(b"retrying")
    store.record_failures(relay, [FailureUpdate(waits, 1, "try again", False, 300.0)])
    insert(b"retrying")
    assert store.pending_stats(ALL).total() == PendingStats(4, 3, None)
    insert(b"fresh")
    stats = store.pending_stats(ALL).total()
    assert (stats.pending, stats.held) == (5, 3) and stats.lag_seconds is not None


def test_only_the_owner_writes_outcomes_and_only_once(under_test):
    store, insert = under_test.store, under_test.insert
    owner, other = uuid.uuid4(), uuid.uuid4()
    store.heartbeat(owner, "a", 60)
    rows = [insert(b"k%d" % i) for i in range(3)]
    done = [Delivered(r, 0, n) for n, r in enumerate(rows)]
    assert store.mark_confirmed(other, done) == 0  # owns no bucket
    assert store.record_failures(other, [FailureUpdate(rows[0], 1, "x", True, 0.0)]) == 0
    assert store.mark_confirmed(owner, done) == 3
    assert store.mark_confirmed(owner, done) == 0  # no longer PENDING
    assert store.fetch_pending(ALL, 10) == [] and store.pending_stats(ALL).total()[0] == 0


def test_a_delivered_row_keeps_no_error(under_test):
    """last_error says why a row is not delivered yet: `outbox list --error X` must not list
    rows that were delivered after a retry (attempts still says it took more than one)."""
    store, insert = under_test.store, under_test.insert
    relay = uuid.uuid4()
    store.heartbeat(relay, "a", 60)
    row_id = insert(b"k")
    store.record_failures(relay, [FailureUpdate(row_id, 1, "transient: timed out", False, 0.0)])
    assert under_test.row(row_id) == ("PENDING", "transient: timed out")
    assert store.mark_confirmed(relay, [Delivered(row_id, 0, 7)]) == 1
    assert under_test.row(row_id) == ("CONFIRMED", None)


def test_retention_deletes_confirmed_rows_only_in_batches(under_test):
    store, insert = under_test.store, under_test.insert
    relay = uuid.uuid4()
    store.heartbeat(relay, "a", 60)
    rows = [insert(b"k%d" % i) for i in range(4)]
    store.mark_confirmed(relay, [Delivered(r, 0, 0) for r in rows[:3]])
    assert store.delete_confirmed(3600, 10) == 0  # none is an hour old
    assert store.delete_confirmed(0, 2) == 2
    assert store.delete_confirmed(0, 10) == 1
    assert ids(store.fetch_pending(ALL, 10)) == [rows[3]]


def test_leases_move_in_whole_shards(sharded):
    store = sharded.store
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert store.heartbeat(a, "a", 60) == ALL
    assert store.heartbeat(b, "b", 60) == frozenset()  # until a gives its surplus back
    store.heartbeat(c, "c", 60)
    owned = [store.heartbeat(r, r.hex, 60) for r in (a, b, c)]
    owned = [store.heartbeat(r, r.hex, 60) for r in (a, b, c)]  # b and c took what a gave
    assert sorted(len(o) for o in owned) == [80, 80, 96]  # 16 shards: 6 + 5 + 5
    for buckets in owned:
        assert whole_shards(buckets, 16) == {b // 16 for b in buckets}
    assert frozenset().union(*owned) == ALL


def test_rows_are_confirmed_from_kafka_only_by_id_and_message_id(under_test):
    store, insert = under_test.store, under_test.insert
    owner, other = uuid.uuid4(), uuid.uuid4()
    store.heartbeat(owner, "a", 60)
    for key in (b"a", b"b", b"c"):
        insert(key)
    pending = store.fetch_pending(ALL, 10)
    named = [(m.id, message_tag(m.message_id)) for m in pending]
    assert store.confirm_from_kafka(other, named) == 0  # owns no bucket
    wrong = [(named[0][0], bytes(8)), named[1]]  # a row of another table had id 1
    assert store.confirm_from_kafka(owner, wrong) == 1
    assert ids(store.fetch_pending(ALL, 10)) == [named[0][0], named[2][0]]
    assert store.confirm_from_kafka(owner, named) == 2
    assert store.confirm_from_kafka(owner, named) == 0  # no longer PENDING


def test_the_read_takes_turns_across_tenants_and_topics(under_test):
    """A tenant's backlog delays another tenant's rows by no more than one read: each
    (tenant, topic) group with rows waiting takes turns, its rows in id order."""
    store, insert = under_test.store, under_test.insert
    store.heartbeat(uuid.uuid4(), "a", 60)
    big = [insert(b"b%d" % (i % 7), tenant="big") for i in range(40)]
    small = [insert(b"s%d" % i, tenant="small") for i in range(3)]
    # Two groups, a read of 10: turns 1-3 of both, then the backlog's turns 4-7.
    assert ids(store.fetch_pending(ALL, 10)) == big[:7] + small
    # Within one tenant, topics take turns too; rows without a tenant are a group of their own.
    other_topic = [insert(b"o%d" % i, topic="u", tenant="big") for i in range(2)]
    untenanted = [insert(b"n0")]
    batch = ids(store.fetch_pending(ALL, 9))
    assert batch == sorted(big[:3] + small + other_topic + untenanted)
    # A single group reads as before: id order up to the limit.
    assert ids(store.fetch_pending(ALL, 100, exclude=small + other_topic + untenanted)) == big


def test_a_key_is_held_back_within_its_tenant_only(under_test):
    """Tenants that use the same key are separate sequences: a FAILED row holds its tenant's
    later rows of the key, not another tenant's."""
    store, insert = under_test.store, under_test.insert
    relay = uuid.uuid4()
    store.heartbeat(relay, "a", 60)
    a1, b1, _, b2 = (insert(b"K", tenant=t) for t in ("a", "b", "a", "b"))
    assert store.record_failures(relay, [FailureUpdate(a1, 1, "rejected", True, 0.0)]) == 1
    assert ids(store.fetch_pending(ALL, 10)) == [b1, b2]
    stats = store.pending_stats(ALL)
    assert stats[("a", "t")] == PendingStats(1, 1, None)
    assert stats[("b", "t")].pending == 2 and stats[("b", "t")].held == 0
    assert stats.by_tenant().keys() == {"a", "b"} and stats.total().pending == 3


def test_groups_with_nothing_to_send_do_not_shrink_the_read(under_test):
    """Groups whose rows are all held behind a FAILED key count in the split of a read and
    give nothing: the groups that filled their share read on, and the batch is full."""
    store, insert = under_test.store, under_test.insert
    relay = uuid.uuid4()
    store.heartbeat(relay, "a", 60)
    failed = []
    for t in range(30):
        failed.append(insert(b"K", tenant=f"held-{t}"))
        insert(b"K", tenant=f"held-{t}")
    assert store.record_failures(relay, [FailureUpdate(f, 1, "x", True, 0.0) for f in failed]) == 30
    deep = [insert(b"d%d" % (i % 5), tenant="deep") for i in range(40)]
    # 31 groups, a read of 10: a share of 2 each, and only the deep group has rows to send.
    assert ids(store.fetch_pending(ALL, 10)) == deep[:10]
    # With a second deep group, the top-up takes turns between the two.
    other = [insert(b"o%d" % i, tenant="other") for i in range(40)]
    assert ids(store.fetch_pending(ALL, 10)) == deep[:5] + other[:5]


def test_scheduled_rows_wait_outside_the_read_hold_nothing_and_are_promoted_when_due(
    under_test,
):
    store, insert = under_test.store, under_test.insert
    store.heartbeat(uuid.uuid4(), "a", 60)
    first = insert(b"k")
    reminder = under_test.schedule(b"k", 3600)
    later = insert(b"k")
    other = under_test.schedule(b"j", 7200)
    assert under_test.row(reminder)[0] == under_test.row(other)[0] == "SCHEDULED"
    # Not read, not waiting, and its key's later row is not held behind it.
    assert ids(store.fetch_pending(ALL, 10)) == [first, later]
    assert store.pending_stats(ALL).total()[:2] == (2, 0)
    assert store.scheduled_count() == 2
    assert 3500 < store.next_due() <= 3600
    assert store.promote_due(10) == 0
    # Retention deletes CONFIRMED rows only, however old the cut-off makes the rest.
    assert store.delete_confirmed(1e-6, 100) == 0 and store.scheduled_count() == 2
    under_test.make_due(reminder)
    assert store.next_due() <= 0
    assert store.promote_due(10) == 1
    assert under_test.row(reminder)[0] == "PENDING"
    # Among its key's rows still waiting it takes its place by id.
    assert ids(store.fetch_pending(ALL, 10)) == [first, reminder, later]
    assert store.scheduled_count() == 1 and 7000 < store.next_due() <= 7200
    assert store.promote_due(10) == 0


def test_promotion_takes_the_earliest_due_first_in_batches_of_its_limit(under_test):
    rows = [under_test.schedule(b"k%d" % i, 3600) for i in range(5)]
    for row_id in reversed(rows[1:]):
        under_test.make_due(row_id)  # rows[4] falls due first, rows[1] last
    assert under_test.store.promote_due(2) == 2
    status = [under_test.row(r)[0] for r in rows]
    assert status == ["SCHEDULED", "SCHEDULED", "SCHEDULED", "PENDING", "PENDING"]
    assert under_test.store.promote_due(2) == 2
    assert under_test.store.promote_due(2) == 0
    assert [under_test.row(r)[0] for r in rows] == ["SCHEDULED"] + ["PENDING"] * 4


def test_rate_limit_caps_bound_each_group_and_name_the_groups_left_out(under_test):
    """The read under rate limits: a tenant's or topic's cap bounds each of its groups, top-up
    included; a group capped at 0 is not read and is named with the rows; the others fill."""
    from relay.rate_limits import GroupCaps

    store, insert = under_test.store, under_test.insert
    store.heartbeat(uuid.uuid4(), "a", 60)
    big = [insert(b"b%d" % (i % 5), tenant="big") for i in range(30)]
    sms = [insert(b"s%d" % i, topic="sms", tenant="small") for i in range(6)]
    mail = [insert(b"m%d" % i, topic="mail", tenant="small") for i in range(6)]
    # Tenant big capped at 4, topic sms at 0: big's first 4, none of sms (left out), all mail.
    fetched = store.fetch_pending(ALL, 20, caps=GroupCaps(["big"], [4], ["sms"], [0]))
    assert ids(fetched) == big[:4] + mail
    assert fetched.left_out == {("small", "sms")}
    # Left out with nothing this relay could send now (here: all in flight): not named.
    fetched = store.fetch_pending(ALL, 20, exclude=sms, caps=GroupCaps([], [], ["sms"], [0]))
    assert not fetched.left_out and ids(fetched) == sorted(big[:14] + mail)
    # Turns across the groups as without caps, big's stopping at 12 (turns 1-6 of all three,
    # then big's 7th and 8th).
    fetched = store.fetch_pending(ALL, 20, caps=GroupCaps(["big"], [12], [], []))
    assert ids(fetched) == sorted(big[:8] + sms + mail) and not fetched.left_out
    # The top-up reads on past the share, up to the cap only: six groups (five with nothing
    # deliverable now), a read of 10 gives big a share of 7, and the top-up one more (cap 8).
    others = [insert(b"o", topic=f"x{i}", tenant="other") for i in range(3)]
    waiting = sms + mail + others
    assert ids(store.fetch_pending(ALL, 10, exclude=waiting)) == big[:10]
    capped = store.fetch_pending(ALL, 10, exclude=waiting, caps=GroupCaps(["big"], [8], [], []))
    assert ids(capped) == big[:8]


def test_rate_limit_buckets_are_shared_kept_and_forgotten(under_test):
    """The buckets: the last relay started puts its rate in force for all (the others keep,
    never override); a bucket lost while in use comes back empty, never with a burst; taking
    refills at the table's rate; tenants are known once registered or with rows waiting."""
    from relay.config import parse_rate_limits

    store = under_test.store
    old, new = parse_rate_limits("tenant:a=1:5"), parse_rate_limits("tenant:a=1000:20")
    store.set_rate_limits(old)
    store.set_rate_limits(new)  # a relay started with the new limit
    store.keep_rate_limits(old)  # a relay of the old configuration, at its heartbeat
    assert store.take_tokens(old, [50], [False]).granted[0] >= 5  # emptied
    time.sleep(0.05)  # the time whose refill is measured
    # Refilled at the table's 1000 a second up to its burst of 20, whatever the caller's
    # limit says (at 1 a second, up to 5, it would be 0 or 1).
    assert store.take_tokens(old, [50], [False]).granted[0] >= 15
    # Tenants: none known, then one with a row waiting, one registered.
    assert store.known_tenants(["x", "y"]) == set()
    under_test.insert(b"k", tenant="x")
    store.register_tenants(["y"])
    assert store.known_tenants(["x", "y", "z"]) == {"x", "y"}
