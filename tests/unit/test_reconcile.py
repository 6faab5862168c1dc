"""outbox reconcile's categories, against an in-memory record source: what each row becomes,
and the exit code a cron job sees."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence

import pytest

from relay.prefetch import Prefetch
from relay.reconcile import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_UNCHECKED,
    Absent,
    Reconciler,
    Record,
    Row,
    Unavailable,
)
from relay.reconcile_rows import Pager


def digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


class FakeSource:
    """Partitions as {(topic, partition): (first offset, end, {offset: Record})}; a partition
    may also be absent (Absent) or broken (Unavailable), or fail after some records. A topic's
    cleanup.policy is "delete" unless POLICIES gives another, or an Unavailable."""

    def __init__(self, partitions, *, absent=(), unavailable=(), fail_after=None, policies=None):
        self.partitions = partitions
        self.policies = policies or {}
        self.policy_asked: list[str] = []
        self.absent = set(absent)
        self.unavailable = set(unavailable)
        self.fail_after = fail_after  # {(topic, partition): records handed out before failing}
        self.reads: list[tuple[str, int, list[int]]] = []

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        if (topic, partition) in self.absent:
            raise Absent(f"no partition {partition}")
        if (topic, partition) in self.unavailable:
            raise Unavailable("broker down")
        low, end, _ = self.partitions[(topic, partition)]
        return low, end

    def cleanup_policy(self, topic: str) -> str:
        self.policy_asked.append(topic)
        policy = self.policies.get(topic, "delete")
        if isinstance(policy, Unavailable):
            raise policy
        return policy

    def read(self, topic: str, wanted: Mapping[int, Sequence[int]]):
        """One partition after the other (the protocol allows them interleaved)."""
        for partition, offsets in wanted.items():
            self.reads.append((topic, partition, list(offsets)))
            _, _, records = self.partitions[(topic, partition)]
            limit = (self.fail_after or {}).get((topic, partition))
            for n, offset in enumerate(offsets):
                if limit is not None and n >= limit:
                    yield partition, -1, Unavailable("no answer within 15 s")
                    break
                yield partition, offset, records.get(offset)


def row(
    i: int, offset: int | None, *, topic="t", partition: int | None = 0, key=b"k", payload=b"p"
):
    return Row(i, str(uuid.UUID(int=i)), topic, partition, offset, key, digest(payload))


def record_of(r: Row, **changes) -> Record:
    values = {"message_id": r.message_id.encode(), "key": r.key, "digest": r.digest}
    values.update(changes)
    return Record(**values)


def check(rows, source, **kw):
    return Reconciler(source, **kw).check(rows)


def by_id(report):
    return {p.row.id: p for p in report.problems}


def test_every_row_found_intact_is_ok_and_exits_0():
    rows = [row(i, 10 + i) for i in range(5)]
    source = FakeSource({("t", 0): (0, 100, {r.offset: record_of(r) for r in rows})})
    report = check(rows, source)
    assert report.counts["ok"] == 5 and report.checked == 5
    assert report.problems == [] and report.exit_code() == EXIT_OK


@pytest.mark.parametrize(
    "change, fields",
    [
        ({"message_id": str(uuid.UUID(int=99)).encode()}, ("message_id",)),
        ({"message_id": None}, ("message_id",)),
        ({"key": b"other"}, ("key",)),
        ({"key": None}, ("key",)),
        ({"digest": digest(b"tampered")}, ("payload",)),
        ({"key": b"other", "digest": digest(b"x")}, ("key", "payload")),
    ],
)
def test_a_different_record_is_mismatched_naming_the_field(change, fields):
    good, bad = row(1, 5), row(2, 6)
    source = FakeSource({("t", 0): (0, 10, {5: record_of(good), 6: record_of(bad, **change)})})
    report = check([good, bad], source)
    assert report.counts["ok"] == 1 and report.counts["mismatched"] == 1
    problem = by_id(report)[2]
    assert problem.problem == "mismatched" and problem.fields == fields
    assert report.exit_code() == EXIT_PROBLEMS


def test_offsets_below_the_start_are_expired_and_beyond_the_end_missing():
    rows = [row(1, 3), row(2, 10), row(3, 19), row(4, 20), row(5, 500)]
    records = {10: record_of(rows[1]), 19: record_of(rows[2])}
    report = check(rows, FakeSource({("t", 0): (10, 20, records)}))
    problems = by_id(report)
    assert problems[1].problem == "expired" and "retention" in problems[1].detail
    assert problems[4].problem == "missing" and "end" in problems[4].detail
    assert problems[5].problem == "missing"
    assert report.counts == {"ok": 2, "missing": 2, "mismatched": 0, "expired": 1, "unreadable": 0}
    assert report.exit_code() == EXIT_PROBLEMS


def test_only_offsets_between_the_watermarks_are_read():
    rows = [row(1, 3), row(2, 10), row(3, 19), row(4, 20)]
    source = FakeSource({("t", 0): (10, 20, {10: record_of(rows[1]), 19: record_of(rows[2])})})
    check(rows, source)
    assert source.reads == [("t", 0, [10, 19])]


def test_a_missing_topic_or_partition_makes_every_row_of_it_missing():
    rows = [row(1, 0, partition=0), row(2, 1, partition=0), row(3, 0, partition=7)]
    source = FakeSource({("t", 0): (0, 5, {})}, absent={("t", 0), ("t", 7)})
    report = check(rows, source)
    assert report.counts["missing"] == 3
    assert all(p.detail.startswith("no partition") for p in report.problems)


def test_expired_or_unreadable_alone_exits_3_could_not_check():
    rows = [row(1, 1), row(2, 8)]
    source = FakeSource({("t", 0): (5, 10, {8: record_of(rows[1])})})
    report = check(rows, source)
    assert report.counts["expired"] == 1 and report.exit_code() == EXIT_UNCHECKED


def test_no_committed_record_at_the_offset_of_a_topic_not_compacted_is_missing():
    """Only compaction removes a committed record from below the end: on a topic without it,
    the offset holds an aborted transaction's record or a marker, and no consumer reads the
    row's message there."""
    rows = [row(1, 4), row(2, 5), row(3, 6), row(4, 2, partition=1)]
    source = FakeSource(
        {("t", 0): (0, 10, {5: record_of(rows[1])}), ("t", 1): (0, 10, {})}
    )  # 4, 6 and 1's 2: a marker, an aborted record...
    report = check(rows, source)
    problems = by_id(report)
    assert report.counts["missing"] == 3 and report.counts["unreadable"] == 0
    assert problems[1].problem == "missing"
    assert problems[1].detail == (
        "no committed record at this offset (an aborted transaction or a control record)"
    )
    assert report.exit_code() == EXIT_PROBLEMS
    assert source.policy_asked == ["t"]  # once for the topic, not once a row or a partition


@pytest.mark.parametrize("policy", ["compact", "compact,delete", "delete, compact"])
def test_no_committed_record_at_the_offset_of_a_compacted_topic_is_unreadable(policy):
    rows = [row(1, 4), row(2, 5)]
    source = FakeSource({("t", 0): (0, 10, {5: record_of(rows[1])})}, policies={"t": policy})
    report = check(rows, source)
    problem = by_id(report)[1]
    assert problem.problem == "unreadable" and "no committed record" in problem.detail
    assert "compacted" in problem.detail
    assert report.exit_code() == EXIT_UNCHECKED


def test_no_committed_record_where_the_policy_cannot_be_read_is_unreadable_saying_why():
    rows = [row(1, 4), row(2, 4, topic="u"), row(3, 5, topic="u")]
    denied = Unavailable("DescribeConfigs on the topic is not allowed")
    source = FakeSource({("t", 0): (0, 10, {}), ("u", 0): (0, 10, {})}, policies={"t": denied})
    report = check(rows, source)
    problems = by_id(report)
    assert problems[1].problem == "unreadable"
    assert "cleanup.policy could not be read: DescribeConfigs" in problems[1].detail
    assert problems[2].problem == problems[3].problem == "missing"  # each topic its own policy
    assert sorted(source.policy_asked) == ["t", "u"]


def test_a_row_without_a_recorded_place_is_unreadable():
    rows = [row(1, None, partition=None), row(2, None, partition=0)]
    report = check(rows, FakeSource({("t", 0): (0, 10, {})}))
    assert report.counts["unreadable"] == 2
    assert all("no recorded partition and offset" in p.detail for p in report.problems)


def test_a_broker_that_cannot_be_read_makes_the_rest_unreadable_not_missing():
    rows = [row(i, i) for i in range(6)] + [row(10, 0, partition=1)]
    records = {i: record_of(rows[i]) for i in range(6)}
    source = FakeSource(
        {("t", 0): (0, 10, records), ("t", 1): (0, 10, {})},
        unavailable={("t", 1)},
        fail_after={("t", 0): 2},
    )
    report = check(rows, source)
    assert report.counts["ok"] == 2 and report.counts["unreadable"] == 5
    assert by_id(report)[10].detail == "broker down"
    assert by_id(report)[3].detail == "no answer within 15 s"
    assert report.exit_code() == EXIT_UNCHECKED


def test_missing_wins_over_unreadable_for_the_exit_code():
    rows = [row(1, None, partition=None), row(2, 50)]
    report = check(rows, FakeSource({("t", 0): (0, 10, {})}))
    assert report.exit_code() == EXIT_PROBLEMS


def test_rows_sharing_an_offset_are_each_compared_and_the_offset_read_once():
    a, b = row(1, 7), row(2, 7)  # e.g. one row's offset edited to another's
    source = FakeSource({("t", 0): (0, 10, {7: record_of(a)})})
    report = check([a, b], source)
    assert report.counts["ok"] == 1 and by_id(report)[2].fields == ("message_id",)
    assert source.reads == [("t", 0, [7])]


def test_partitions_are_read_in_chunks_in_order_with_progress():
    rows = [row(i, i) for i in range(25)] + [row(100 + i, i, partition=1) for i in range(5)]
    records = {(r.partition, r.offset): record_of(r) for r in rows}
    source = FakeSource(
        {
            ("t", p): (0, 100, {o: rec for (pp, o), rec in records.items() if pp == p})
            for p in (0, 1)
        }
    )
    done: list[int] = []
    report = Reconciler(source, chunk=10, progress=done.append).check(iter(rows))
    assert report.counts["ok"] == 30
    assert [(t, p, o[0], len(o)) for t, p, o in source.reads] == [
        ("t", 0, 0, 10),
        ("t", 0, 10, 10),
        ("t", 0, 20, 5),
        ("t", 1, 0, 5),
    ]
    assert done == [10, 10, 5, 5]


def test_the_listed_problems_are_capped_but_all_counted():
    rows = [row(i, 1000 + i) for i in range(50)]
    report = Reconciler(FakeSource({("t", 0): (0, 10, {})}), max_listed=7).check(rows)
    assert report.counts["missing"] == 50 and len(report.problems) == 7
    assert report.truncated and report.as_dict()["problems_truncated"] is True


def test_json_shape():
    rows = [row(1, 1, key=b"\x00\xff"), row(2, 2)]
    source = FakeSource({("t", 0): (0, 10, {2: record_of(rows[1], digest=b"x")})})
    out = check(rows, source).as_dict()
    assert out["checked"] == 2 and out["exit_code"] == EXIT_PROBLEMS
    assert out["counts"] == {"ok": 0, "missing": 1, "mismatched": 1, "expired": 0, "unreadable": 0}
    first = out["problems"][0]
    assert set(first) == {
        "id",
        "message_id",
        "topic",
        "partition",
        "offset",
        "key",
        "problem",
        "fields",
        "detail",
    }
    assert first["key"] == "0x00ff" and first["message_id"] == str(uuid.UUID(int=1))
    assert out["problems"][1]["fields"] == ["payload"]


def test_a_record_without_a_value_matches_no_payload():
    assert Record.of(b"k", None, None).digest != digest(b"")
    assert Record.of(b"k", b"", [("message_id", b"x")]).message_id == b"x"


def test_watermarks_are_read_again_for_a_row_beyond_the_end_read_before():
    """A later chunk may hold a row confirmed after its partition's end was read: it is
    missing only if it lies beyond the end read again."""
    early, late = row(1, 3), row(2, 12)
    source = FakeSource({("t", 0): (0, 10, {3: record_of(early), 12: record_of(late)})})
    checker = Reconciler(source, chunk=1)
    checker.check([early])
    source.partitions[("t", 0)] = (0, 20, source.partitions[("t", 0)][2])  # the log grew
    report = checker.check([late])
    assert report.counts["ok"] == 2 and report.problems == []


# ------------------------------------------------------------ bounded memory, the fetch thread


class CountedRow(Row):
    """A Row that counts how many of its kind are alive."""

    __slots__ = ()
    alive = 0
    peak = 0

    def __del__(self) -> None:
        CountedRow.alive -= 1


def counted_row(i: int, partition: int, offset: int) -> Row:
    CountedRow.alive += 1
    CountedRow.peak = max(CountedRow.peak, CountedRow.alive)
    return tuple.__new__(CountedRow, (i, str(uuid.UUID(int=i)), "t", partition, offset, b"k", b"d"))


class FakePager(Pager):
    """PAGES pages of SIZE rows in id order, spread over 3 partitions as a relay leaves them;
    endless when PAGES is None. Notes when its generator is closed."""

    def __init__(self, size: int, pages: int | None):
        self.size, self.count = size, pages
        self.total = (pages or 1) * size
        self.closed = False

    def pages(self):
        try:
            n = 0
            while self.count is None or n < self.count:
                rows = [
                    counted_row(i, i % 3, i // 3) for i in range(n * self.size, (n + 1) * self.size)
                ]
                n += 1
                yield n * self.size, rows
        finally:
            self.closed = True


class EveryRecordThere:
    """Every offset holds the counted rows' record; notes the rows alive at each read."""

    def __init__(self, fail_after_reads: int | None = None, exc: BaseException | None = None):
        self.alive_at_reads: list[int] = []
        self.wanted_at_reads: list[int] = []
        self.fail_after_reads, self.exc = fail_after_reads, exc

    def watermarks(self, topic, partition):
        return 0, 10**9

    def read(self, topic, wanted):
        self.alive_at_reads.append(CountedRow.alive)
        self.wanted_at_reads.append(sum(len(o) for o in wanted.values()))
        if self.fail_after_reads is not None and len(self.alive_at_reads) > self.fail_after_reads:
            raise self.exc or RuntimeError("a bug in the reader")
        for partition, offsets in wanted.items():
            for offset in offsets:
                i = offset * 3 + partition
                yield partition, offset, Record(str(uuid.UUID(int=i)).encode(), b"k", b"d")


def test_the_checker_holds_one_chunk_of_rows_whatever_the_window():
    chunk, page, depth = 1000, 100, 3
    pager = FakePager(page, 200)  # 20,000 rows: 20 chunks
    source = EveryRecordThere()
    CountedRow.alive = CountedRow.peak = 0
    with Prefetch(pager.pages, depth=depth) as ahead:
        report = Reconciler(source, chunk=chunk).check(pager.rows(ahead))
    assert report.counts["ok"] == 20_000 and report.checked == 20_000
    assert len(source.wanted_at_reads) == 20 and max(source.wanted_at_reads) == chunk
    # At most: the chunk being checked (or built), the pages queued, the one being made, the
    # rest of the page the chunk was cut from; never the chunk before as well (2,000 and more).
    assert max(source.alive_at_reads) <= CountedRow.peak <= chunk + (depth + 2) * page
    assert CountedRow.alive == 0 and pager.closed and pager.position == 20_000


@pytest.mark.parametrize("exc", [RuntimeError("a bug in the reader"), KeyboardInterrupt()])
def test_the_fetch_thread_is_stopped_and_joined_when_the_checker_fails(exc):
    pager = FakePager(100, None)  # endless: the thread stops only when told
    source = EveryRecordThere(fail_after_reads=2, exc=exc)
    prefetch = Prefetch(pager.pages, depth=2)
    with pytest.raises(type(exc)), prefetch as ahead:
        Reconciler(source, chunk=500).check(pager.rows(ahead))
    assert not prefetch.thread.is_alive() and pager.closed


def test_an_error_of_the_fetch_thread_reaches_the_reader_after_the_pages_before_it():
    def pages():
        yield 1, [row(1, 1)]
        yield 2, [row(2, 2)]
        raise OSError("the database went away")

    got = []
    prefetch: Prefetch = Prefetch(pages, depth=1)
    with pytest.raises(OSError, match="went away"), prefetch as ahead:
        for _, rows in ahead:
            got += rows
    assert [r.id for r in got] == [1, 2] and not prefetch.thread.is_alive()


def test_a_producer_blocked_on_a_full_queue_is_stopped_at_the_exit():
    pager = FakePager(10, None)
    prefetch = Prefetch(pager.pages, depth=1)
    with prefetch as ahead:
        next(iter(ahead))
        time.sleep(0.05)  # the thread is now waiting for room in the queue
    assert not prefetch.thread.is_alive() and pager.closed
