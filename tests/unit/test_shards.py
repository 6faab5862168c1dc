"""Shards of buckets, shard-aligned leases and the progress record's format (relay.shards)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from relay.model import BUCKETS
from relay.shards import (
    MAX_PROGRESS_IDS,
    ProgressError,
    buckets_of,
    decode_progress,
    encode_progress,
    message_tag,
    plan_lease,
    shard_of,
    validate_shards,
    whole_shards,
)
from relay.testing import FakeClock, InMemoryStore


def test_shards_must_divide_the_buckets():
    for good in (1, 2, 16, 256):
        assert validate_shards(good) == good
    for bad in (0, 3, 24, 512):
        with pytest.raises(ValueError, match="must divide 256"):
            validate_shards(bad)


def test_every_bucket_is_in_exactly_one_shard():
    for shards in (1, 4, 16, 256):
        seen = [b for s in range(shards) for b in buckets_of(s, shards)]
        assert seen == list(range(BUCKETS))
        assert all(shard_of(b, shards) == s for s in range(shards) for b in buckets_of(s, shards))


def test_whole_shards_ignores_shards_held_in_part():
    assert whole_shards([*range(16), 16, 17], 16) == {0}
    assert whole_shards(range(256), 16) == set(range(16))


def test_a_lease_plan_gives_back_split_shards_and_the_surplus():
    # One relay of two, holding shard 0 whole, 3 buckets of shard 1 and shards 2-9 whole.
    owned = [*range(16), 16, 17, 18, *range(32, 160)]
    release, wanted = plan_lease(owned, alive=2, rank=0, shards=16)
    assert release == [16, 17, 18, *range(144, 160)]  # the split shard, and shard 9: surplus
    assert wanted == 0
    release, wanted = plan_lease([], alive=3, rank=0, shards=16)
    assert (release, wanted) == ([], 6)  # 16 = 6 + 5 + 5
    assert plan_lease([], alive=3, rank=2, shards=16) == ([], 5)


def test_in_memory_relays_lease_whole_shards_and_share_them():
    clock = FakeClock()
    store = InMemoryStore(clock.monotonic, shards=16)
    a, b = uuid.uuid4(), uuid.uuid4()
    assert len(store.heartbeat(a, "a", 30)) == 256
    assert store.heartbeat(b, "b", 30) == frozenset()  # a holds everything until it renews
    first = store.heartbeat(a, "a", 30)
    second = store.heartbeat(b, "b", 30)
    assert len(first) == len(second) == 128
    assert not first & second
    assert whole_shards(first, 16) | whole_shards(second, 16) == set(range(16))


def named(ids):
    return [(i, i.to_bytes(8, "big")) for i in ids]


def test_a_progress_record_round_trips_and_stays_small():
    rows = named([*range(1_000_000, 1_002_000), 5, 7, 2**40])
    value = encode_progress(16, 3, rows + rows[:10])  # repeats are named once
    assert decode_progress(value, 16, 3) == sorted(rows)
    assert len(value) < 11 * len(rows) + 20  # about a byte an id, plus its 8-byte tag
    assert decode_progress(encode_progress(16, 0, []), 16, 0) == []


def test_a_tag_is_the_random_end_of_the_message_id():
    message_id = uuid.UUID("01890a5d-ac96-774b-bcce-b302099a8057")
    assert message_tag(message_id) == message_tag(str(message_id)) == message_id.bytes[8:]


def test_a_progress_record_of_another_shard_count_or_format_is_refused():
    value = encode_progress(16, 3, named([1, 2, 3]))
    with pytest.raises(ProgressError, match="shard count changed"):
        decode_progress(value, 8, 3)
    with pytest.raises(ProgressError, match="unknown version"):
        decode_progress(b"\x07" + value[1:], 16, 3)
    with pytest.raises(ProgressError, match="truncated"):
        decode_progress(value[:-1], 16, 3)
    with pytest.raises(ValueError, match="do not fit"):
        encode_progress(16, 3, named(range(MAX_PROGRESS_IDS + 1)))


def aborted_transaction(rows: int, alone: frozenset[int] = frozenset()):
    from relay.kafka.transactional import Transaction
    from relay.model import PendingMessage

    batch = [
        PendingMessage(i, uuid.uuid4(), "t", b"k%d" % i, b"x", [], 0, dt.datetime.now(), 0)
        for i in range(1, rows + 1)
    ]
    return Transaction(batch, {}, {}, set(alone), [(m.id, bytes(8)) for m in batch])


def test_a_permanent_abort_no_message_carries_isolates_then_charges_the_lone_message():
    """A transaction aborted by an error of no message of its own (librdkafka purges them
    all: the topic not writable, found when the partition is added to the transaction)
    must not stall its shard: the rows go alone next time, and one that fails alone is
    counted, so that it ends FAILED as it would at least once."""
    from relay.kafka.transactional import TransactionEnd, transaction_outcomes
    from relay.model import FailureKind

    def kinds(txn, end):
        outcomes, _broken = transaction_outcomes(txn, end)
        return [o.kind for o in outcomes]

    cause = TransactionEnd(
        "aborted", "TOPIC_AUTHORIZATION_FAILED: not authorised", FailureKind.PERMANENT
    )
    assert kinds(aborted_transaction(3), cause) == [FailureKind.ISOLATE] * 3
    lone = aborted_transaction(1, frozenset({1}))
    assert kinds(lone, cause) == [FailureKind.PERMANENT]
    outage = TransactionEnd("aborted", "REQUEST_TIMED_OUT", FailureKind.OUTAGE)
    assert kinds(aborted_transaction(2), outage) == [FailureKind.OUTAGE] * 2
