"""The relay loop against the in-memory store and sink, on a fake clock: no sleeps."""

import threading

import pytest

from relay.model import Failed, FailureKind
from relay.relay import LeaseError, Relay
from relay.retry import RetryPolicy
from relay.testing import FakeClock, InMemoryStore, RecordingSink, bucket_of


def make(script=None, **kwargs):
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    sink = RecordingSink(script)
    relay = Relay(
        store,
        sink,
        reader=store,  # the in-memory store may be used from two threads at once
        clock=clock,
        retry=RetryPolicy(max_attempts=3, random=lambda: 0.0),
        **kwargs,
    )
    return clock, store, sink, relay


def fails_payload_a_once():
    """A sink script: the row with payload b"a" fails (transient) the first time it is sent."""
    failed = set()

    def script(m):
        if m.payload == b"a" and m.id not in failed:
            failed.add(m.id)
            return Failed(m.id, FailureKind.TRANSIENT, "NOT_ENOUGH_REPLICAS: try later")
        return None

    return script


def drain(relay, clock, rounds=50, step=0.0):
    for _ in range(rounds):
        if relay.run_once() == 0:
            clock.advance(step)


def test_delivers_every_row_in_id_order_and_confirms_it():
    clock, store, sink, relay = make(batch_size=7)
    rows = [store.insert("t", f"k{i % 3}".encode(), b"%d" % i) for i in range(20)]
    drain(relay, clock)
    assert [m.id for m in sink.sent] == [r.id for r in rows]
    assert all(r.status == "CONFIRMED" for r in rows)
    assert [r.kafka_offset for r in rows] == list(range(20))


def test_permanent_failure_backs_off_holds_its_key_then_fails_while_other_keys_flow():
    bad = {"id": None}

    def script(m):
        if m.id == bad["id"]:
            return Failed(m.id, FailureKind.PERMANENT, "MSG_SIZE_TOO_LARGE: too large")
        return None

    clock, store, sink, relay = make(script)
    first = store.insert("t", b"K", b"1")
    bad["id"] = store.insert("t", b"K", b"2").id
    held = store.insert("t", b"K", b"3")
    other = store.insert("t", b"other", b"4")

    relay.run_once()
    assert first.status == "CONFIRMED" and other.status == "CONFIRMED"
    # The failing row is in the same batch as its successor; the successor is sent only after
    # the failing row resolves (see the next assertions), so it stays PENDING here.
    bad_row = store.rows[bad["id"]]
    assert bad_row.attempts == 1 and bad_row.status == "PENDING"
    # Base 1 s, jitter 0 -> 0.5 s, but a permanent failure waits out the sink's topic cache.
    assert bad_row.next_attempt_at == clock.now + RetryPolicy.permanent_retry_delay
    assert "MSG_SIZE_TOO_LARGE" in bad_row.last_error

    sent_before = len(sink.sent)
    relay.run_once()  # still in backoff: nothing of key K may go
    assert len(sink.sent) == sent_before
    for _ in range(5):
        clock.advance(10)
        relay.run_once()
    assert bad_row.status == "FAILED" and bad_row.attempts == 3
    assert held.status == "PENDING", "a later row of a FAILED key must wait"
    new_other = store.insert("t", b"other", b"5")
    relay.run_once()
    assert new_other.status == "CONFIRMED"


def test_outage_burns_no_attempts_and_pauses_the_relay():
    down = {"on": True}

    def script(m):
        return Failed(m.id, FailureKind.OUTAGE, "_TRANSPORT: broker down") if down["on"] else None

    _clock, store, _sink, relay = make(script, wait_for_work=lambda t, s: None)
    row = store.insert("t", b"k", b"x")
    stop = threading.Event()

    for _ in range(4):
        relay.run_once()
    assert row.attempts == 0 and row.status == "PENDING" and row.last_error is None
    assert relay.paused_for == 4.0  # 0.5, 1, 2, 4: the breaker doubles while nothing gets through
    down["on"] = False
    relay.run_once()
    assert row.status == "CONFIRMED" and relay.paused_for == 0.0
    assert not stop.is_set()


def test_unknown_outcome_is_retried_without_counting_an_attempt():
    calls = []

    def script(m):
        calls.append(m.id)
        if len(calls) == 1:
            return Failed(m.id, FailureKind.UNKNOWN, "no delivery report before the flush deadline")
        return None

    _clock, store, _sink, relay = make(script)
    row = store.insert("t", b"k", b"x")
    relay.run_once()
    assert row.status == "PENDING" and row.attempts == 0
    relay.run_once()
    assert row.status == "CONFIRMED" and calls == [row.id, row.id]


def test_two_relays_split_the_buckets_and_never_share_one():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    a = Relay(store, RecordingSink(), reader=store, clock=clock, name="a")
    b = Relay(store, RecordingSink(), reader=store, clock=clock, name="b")
    a.run_once()
    assert len(a.buckets) == 256
    b.run_once()  # b sees two relays alive but a has not given any back yet
    clock.advance(11)
    a.run_once()  # a's next heartbeat gives back its surplus
    b.run_once()
    assert len(a.buckets) == 128 and len(b.buckets) == 128
    assert not (a.buckets & b.buckets)


def test_a_relay_that_lost_its_lease_cannot_confirm():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    stale = Relay(store, RecordingSink(), reader=store, clock=clock, name="stale", lease_seconds=90)
    stale.run_once()
    row = store.insert("t", b"k", b"x")
    batch = store.fetch_pending(stale.buckets, 10)
    clock.advance(200)  # stale paused past its lease; another relay takes over
    fresh = Relay(store, RecordingSink(), reader=store, clock=clock, name="fresh")
    fresh.heartbeat_if_due()
    assert row.bucket in fresh.buckets
    from relay.model import Delivered

    assert store.mark_confirmed(stale.relay_id, [Delivered(batch[0].id, 0, 0)]) == 0
    assert row.status == "PENDING"
    fresh.run_once()
    assert row.status == "CONFIRMED"


def test_relay_heartbeats_before_its_lease_could_expire_mid_flight():
    clock, store, _sink, relay = make(lease_seconds=90, heartbeat_interval=1000, flush_timeout=35)
    relay.run_once()
    beats = store.relays[relay.relay_id]
    clock.advance(60)  # 60 + 35 > 90: the next batch could outlive the lease
    relay.run_once()
    assert store.relays[relay.relay_id] == beats + 60


def test_run_stops_on_the_event_and_releases_leases():
    stop = threading.Event()
    _clock, store, sink, relay = make(wait_for_work=lambda t, s: stop.set())
    store.insert("t", b"k", b"x")
    relay.run(stop)
    assert store.owners == {} and relay.relay_id not in store.relays
    assert sink.sent and sink.sent[0].payload == b"x"


def test_run_survives_store_errors_and_backs_off():
    stop = threading.Event()
    clock, store, _sink, relay = make(wait_for_work=lambda t, s: stop.set())
    failures = {"n": 3}
    real = store.fetch_pending

    def flaky(buckets, limit, exclude=()):
        if failures["n"]:
            failures["n"] -= 1
            raise ConnectionError("server closed the connection")
        return real(buckets, limit, exclude)

    store.fetch_pending = flaky
    row = store.insert("t", b"k", b"x")
    relay.run(stop)
    assert clock.waits == [0.5, 1.0, 2.0]  # three errors, three backoffs, then delivered
    assert row.status == "CONFIRMED"


@pytest.mark.parametrize("key", [b"abc", b"\x00\xff", b"order-42"])
def test_bucket_hash_is_md5_first_byte(key):
    import hashlib

    assert bucket_of(key, 1) == hashlib.md5(key).digest()[0]


def test_rows_rejected_together_are_sent_alone_next_time_and_only_then_counted():
    poison = {"id": None}

    def script(m):
        return None

    clock, store, sink, relay = make(script)
    rows = [store.insert("t", f"k{i}".encode(), b"x") for i in range(3)]
    poison["id"] = rows[1].id

    def first_round(m):
        return Failed(m.id, FailureKind.ISOLATE, "MSG_SIZE_TOO_LARGE: batch rejected")

    def alone_round(m):
        if m.id == poison["id"]:
            return Failed(m.id, FailureKind.PERMANENT, "MSG_SIZE_TOO_LARGE: too large")
        return None

    sink.script = first_round
    relay.run_once()
    assert all(r.attempts == 0 and r.status == "PENDING" for r in rows)
    sink.script = alone_round
    relay.run_once()
    assert sink.alone_requests[-1] == frozenset(r.id for r in rows)
    assert rows[0].status == rows[2].status == "CONFIRMED"
    assert rows[1].attempts == 1 and "too large" in rows[1].last_error
    clock.advance(10)
    relay.run_once()
    assert sink.alone_requests[-1] == frozenset(), "a row with its own outcome is not isolated"


# -- the pipelined step: a batch's outcomes are written while the next batch is sent


def test_a_batch_is_written_while_the_next_one_is_sent():
    _clock, store, sink, relay = make(batch_size=5)
    rows = [store.insert("t", b"k%d" % i, b"%d" % i) for i in range(12)]
    reads = []
    fetch = store.fetch_pending
    store.fetch_pending = lambda *a: reads.append(a) or fetch(*a)

    assert relay.step() == 5
    assert all(r.status == "PENDING" for r in rows)  # sent, not written yet
    assert reads[-1][2] == [r.id for r in rows[:5]]  # the next batch was read without them
    assert relay.step() == 5
    assert [r.status for r in rows[:5]] == ["CONFIRMED"] * 5
    assert len(reads) == 3  # one read at start, then one per step, done by the helper
    assert relay.step() == 2
    relay.settle()
    assert all(r.status == "CONFIRMED" for r in rows)
    assert [m.id for m in sink.sent] == [r.id for r in rows]
    assert relay.step() == 0


def test_a_key_that_failed_is_dropped_from_the_batch_read_ahead():
    """Its next row was read while its failure was unknown: sending it would overtake."""
    script = fails_payload_a_once()

    clock, store, sink, relay = make(script, batch_size=2)
    a = store.insert("t", b"K", b"a")
    x = store.insert("t", b"X", b"x")
    b = store.insert("t", b"K", b"b")
    y = store.insert("t", b"Y", b"y")
    assert relay.step() == 2  # a fails, x delivered; b and y were read meanwhile
    assert relay.step() == 1  # y alone: b waits for a
    assert [m.id for m in sink.sent] == [x.id, y.id]
    for _ in range(20):
        clock.advance(5)
        relay.step()
    relay.settle()
    assert [m.id for m in sink.sent if m.key == b"K"] == [a.id, b.id]
    assert all(r.status == "CONFIRMED" for r in (a, x, b, y))


def test_outcomes_survive_a_database_error_in_the_helper():
    _clock, store, sink, relay = make(batch_size=3)
    rows = [store.insert("t", b"k%d" % i, b"%d" % i) for i in range(6)]
    confirm = store.mark_confirmed
    calls = {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("server closed the connection unexpectedly")
        return confirm(*a)

    store.mark_confirmed = flaky
    relay.step()
    with pytest.raises(ConnectionError):
        relay.step()  # the helper failed writing batch 1; batch 2 was delivered meanwhile
    assert all(r.status == "PENDING" for r in rows)
    relay.settle()
    assert all(r.status == "CONFIRMED" for r in rows)
    assert len(sink.sent) == 6  # nothing sent twice


def test_a_rebalance_drops_the_batch_read_ahead_for_buckets_given_away():
    clock, store, sink, relay = make(batch_size=50, heartbeat_interval=10.0)
    rows = [store.insert("t", b"key-%d" % i, b"%d" % i) for i in range(400)]
    relay.step()  # owns all 256 buckets, has read the next 50 rows ahead
    other = Relay(store, RecordingSink(), reader=store, clock=clock, name="other")
    other.heartbeat_if_due()  # joins: the first relay must give half back
    clock.advance(11)
    sent_before = len(sink.sent)
    relay.step()  # heartbeat: 128 buckets given away, then a batch
    mine = relay.buckets
    assert len(mine) == 128
    assert all(
        m_bucket in mine for m_bucket in (bucket_of(m.key, m.id) for m in sink.sent[sent_before:])
    )
    relay.settle()
    assert sum(r.status == "CONFIRMED" for r in rows) == len(sink.sent)


def test_shutdown_writes_the_outcomes_of_the_last_batch_and_leaves_the_read_ahead():
    _clock, store, sink, relay = make(batch_size=10)
    rows = [store.insert("t", b"k", b"%d" % i) for i in range(20)]
    relay.step()
    assert all(r.status == "PENDING" for r in rows)
    relay.shutdown()
    assert [r.status for r in rows] == ["CONFIRMED"] * 10 + ["PENDING"] * 10
    assert len(sink.sent) == 10


def test_a_batch_with_nothing_read_ahead_is_written_before_the_step_returns():
    """At low rates the loop idles after the step: the rows must not stay PENDING meanwhile."""
    _clock, store, _sink, relay = make(batch_size=10)
    rows = [store.insert("t", b"k%d" % i, b"%d" % i) for i in range(3)]
    assert relay.step() == 3
    assert all(r.status == "CONFIRMED" for r in rows)


def test_what_was_read_ahead_is_read_again_after_a_lapsed_lease_even_for_the_same_buckets():
    """Paused past its lease, the relay's buckets went to another relay that failed a row and
    left; the relay gets the same buckets back. Its read-ahead batch predates that failure."""
    clock, store, sink, relay = make(batch_size=2)
    store.insert("t", b"K", b"a1")
    store.insert("t", b"O", b"o1")
    a2 = store.insert("t", b"K", b"a2")
    store.insert("t", b"P", b"o2")
    relay.step()  # a1, o1 sent; a2, o2 read ahead
    clock.advance(relay.settings.lease_seconds + 1)  # paused past its lease

    def fail_a2(m):
        if m.payload == b"a2":
            return Failed(m.id, FailureKind.PERMANENT, "INVALID_RECORD: rejected")
        return None

    other = Relay(
        store,
        RecordingSink(fail_a2),
        reader=store,
        clock=clock,
        name="other",
        retry=RetryPolicy(max_attempts=3, random=lambda: 0.0),
    )
    while other.run_once():
        pass
    assert a2.status == "PENDING" and a2.next_attempt_at > clock.now  # in backoff: blocks K
    other.shutdown()  # leaves; its buckets are free again

    sent_before = len(sink.sent)
    relay.step()  # renews the lease: the same 256 buckets come back
    assert relay.buckets == frozenset(range(256))
    assert a2.id not in [m.id for m in sink.sent[sent_before:]]


def test_a_write_that_keeps_failing_is_given_up_and_its_rows_sent_again_in_order():
    clock, store, sink, relay = make(batch_size=2)
    rows = [store.insert("t", b"K", b"%d" % i) for i in range(2)]
    confirm = store.mark_confirmed

    def refuse(*_):
        raise ValueError("cannot be written")

    store.mark_confirmed = refuse
    for _ in range(12):  # the first step sends and fails to write; each next one writes first
        with pytest.raises(ValueError):
            relay.step()
    assert len(sink.sent) == 2
    store.mark_confirmed = confirm
    drain(relay, clock)
    assert all(r.status == "CONFIRMED" for r in rows)
    assert [m.id for m in sink.sent] == [rows[0].id, rows[1].id] * 2  # sent again, in order


def test_a_read_beside_the_write_leaves_out_the_batch_being_written_and_holds_its_keys():
    """The next batch is read while the outcomes of the batch before are written, and may
    see none of them: the delivered rows would look PENDING (sent twice) and
    a failed key's next row unblocked (sent ahead of the retry). Here the write waits until
    the read beside it is done, so that the read sees nothing of it."""
    script = fails_payload_a_once()

    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    reader = InMemoryStore(clock.monotonic)
    reader.rows = store.rows  # the same table, through its own "connection"
    reader.owners = store.owners
    sink = RecordingSink(script)
    relay = Relay(
        store,
        sink,
        clock=clock,
        reader=reader,
        batch_size=2,
        retry=RetryPolicy(max_attempts=3, random=lambda: 0.0),
    )
    reads = {"n": 0}
    read_happened = threading.Condition()
    fetch, confirm = reader.fetch_pending, store.mark_confirmed

    def counted_fetch(*a):
        rows = fetch(*a)
        with read_happened:
            reads["n"] += 1
            read_happened.notify_all()
        return rows

    gated = []

    def confirm_after_the_read(*a):
        if not gated:  # the first write: held until the read beside it has run
            seen = reads["n"]
            with read_happened:
                gated.append(read_happened.wait_for(lambda: reads["n"] > seen, timeout=10))
        return confirm(*a)

    reader.fetch_pending = counted_fetch
    store.mark_confirmed = confirm_after_the_read
    a = store.insert("t", b"K", b"a")
    x = store.insert("t", b"X", b"x")
    b = store.insert("t", b"K", b"b")
    y = store.insert("t", b"Y", b"y")
    assert relay.step() == 2  # a fails, x delivered; b (held: K failed) and y read meanwhile
    assert relay.step() == 1  # y, while a's failure and x's delivery are written
    assert gated == [True]  # that read ran before the write
    for _ in range(20):
        clock.advance(5)
        relay.step()
    relay.settle()
    assert [m.id for m in sink.sent if m.key == b"K"] == [a.id, b.id]
    assert [m.id for m in sink.sent].count(x.id) == 1  # not read again while being confirmed
    assert all(r.status == "CONFIRMED" for r in (a, x, b, y))


def test_exactly_once_reads_a_backlog_shard_by_shard_and_all_shards_once_caught_up():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic, shards=4)
    sink = RecordingSink()
    relay = Relay(store, sink, reader=store, clock=clock, batch_size=40, shards=4)
    rows = [store.insert("t", f"k{i}".encode(), b"x") for i in range(400)]
    batches = []
    while (n := relay.step()) > 0:
        batches.append(sink.sent[-n:])
    relay.settle()
    assert all(r.status == "CONFIRMED" for r in rows)
    shards_of = [{bucket_of(m.key, m.id) // 64 for m in batch} for batch in batches]
    assert len(shards_of[0]) == 4  # the first read covers every shard: a full batch
    assert all(len(s) == 1 for s in shards_of[1:-2])  # then one shard a batch, in turn
    assert [next(iter(s)) for s in shards_of[1:5]] == [0, 1, 2, 3]
    # Each row once; across shards the order is not the ids' (per key it is: a key is in one).
    assert sorted(m.id for m in sink.sent) == [r.id for r in rows]
    # Caught up: the next read covers every shard again, wherever the next row is.
    store.insert("t", b"late", b"y")
    assert relay.step() == 1 and sink.sent[-1].key == b"late"


def test_a_renewal_that_outlasts_the_lease_is_redone_as_lapsed_before_anything_is_sent():
    """Getting ready for the leases (exactly-once: initialising producers) took so long that
    the lease ran out meanwhile (a pause): nothing is sent on it; the next renewal counts the
    lease as lapsed, so the sink gets everything ready again."""
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)
    calls = []

    class SlowToAdopt(RecordingSink):
        def adopt(self, buckets, lease_lapsed):
            calls.append(lease_lapsed)
            if len(calls) == 2:  # the renewal after the first step: paused past the lease
                clock.advance(100)
            return []

    sink = SlowToAdopt()
    relay = Relay(store, sink, reader=store, clock=clock, lease_seconds=90.0)
    store.insert("t", b"k", b"1")
    assert relay.run_once() == 1 and calls == [True]
    clock.advance(11)  # the next heartbeat is due
    store.insert("t", b"k", b"2")
    assert relay.run_once() == 1
    assert calls == [True, False, True]  # paused in the second; the third starts afresh
    assert len(sink.sent) == 2


def test_a_relay_that_cannot_renew_with_time_to_spare_raises_instead_of_sending():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic)

    class Slow(RecordingSink):
        def adopt(self, buckets, lease_lapsed):
            clock.advance(60)  # of a 90 s lease: 30 s left, a batch needs 38
            return []

    sink = Slow()
    relay = Relay(store, sink, reader=store, clock=clock)
    store.insert("t", b"k", b"1")
    with pytest.raises(LeaseError, match="renewed three times"):
        relay.run_once()
    assert sink.sent == []


def test_a_permanent_failure_is_retried_after_the_topic_cache_expires_then_failed():
    """Three tries, each after the sink's cached answer about the topic has expired, so each
    asks the cluster again; transient failures keep max_attempts and their own backoff."""
    from relay.model import TOPIC_ERROR_TTL, PendingMessage

    policy = RetryPolicy(max_attempts=12, random=lambda: 0.0)
    row = PendingMessage(1, "m", "t", b"k", b"x", [], 0, None, 0)
    gone = Failed(1, FailureKind.PERMANENT, "UNKNOWN_TOPIC_OR_PART")
    first, second = (policy.updates([gone], {1: row._replace(attempts=n)})[0] for n in (0, 1))
    assert not first.give_up and first.delay_seconds > TOPIC_ERROR_TTL
    assert not second.give_up and second.delay_seconds > TOPIC_ERROR_TTL
    assert policy.updates([gone], {1: row._replace(attempts=2)})[0].give_up
    busy = Failed(1, FailureKind.TRANSIENT, "NOT_ENOUGH_REPLICAS")
    assert policy.updates([busy], {1: row._replace(attempts=2)})[0].delay_seconds == 2.0
    assert not policy.updates([busy], {1: row._replace(attempts=10)})[0].give_up


def test_a_tenants_gauges_go_when_its_rows_are_gone():
    from relay.metrics import RelayMetrics
    from relay.model import Backlog, PendingStats

    metrics = RelayMetrics()
    gauge = metrics.registry.get_sample_value
    metrics.observe_renewal(
        256,
        Backlog(
            {
                ("acme", "t"): PendingStats(3, 1, 2.5),
                ("acme", "u"): PendingStats(2, 0, 4.0),
                ("", "t"): PendingStats(7, 0, 1.0),
            }
        ),
    )
    assert gauge("outbox_tenant_pending_messages", {"tenant": "acme"}) == 5
    assert gauge("outbox_tenant_held_messages", {"tenant": "acme"}) == 1
    assert gauge("outbox_tenant_lag_seconds", {"tenant": "acme"}) == 4.0
    assert gauge("outbox_tenant_pending_messages", {"tenant": ""}) is None
    assert gauge("outbox_pending_messages") == 12
    metrics.observe_renewal(256, Backlog({("globex", "t"): PendingStats(1, 0, None)}))
    assert gauge("outbox_tenant_pending_messages", {"tenant": "acme"}) is None
    assert gauge("outbox_tenant_lag_seconds", {"tenant": "globex"}) == 0.0
