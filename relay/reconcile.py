"""`outbox reconcile`: does Kafka hold, at each CONFIRMED row's recorded place, that row's message?

For each row, the record at its topic, partition and offset must carry the row's `message_id`
header, its key and its payload (compared by SHA-256). Every row ends in one category:

- ``ok``;
- ``mismatched``: a record is there but another message_id, key or payload (``fields`` says
  which);
- ``missing``: no such topic or partition, the offset is at or beyond the partition's end, or
  no committed record is at the offset on a topic that is not compacted (an aborted
  transaction's record or a transaction marker: no consumer reads the row's message there);
- ``expired``: the offset is below the partition's first offset: deleted by retention, so it
  cannot be checked;
- ``unreadable``: it could not be checked: no recorded place (rows confirmed from exactly-once
  progress records have none), no committed record at the offset of a compacted topic (the
  record may have been removed by compaction, as compaction may) or of a topic whose
  cleanup.policy cannot be read, an offset beyond the last stable offset (a transaction still
  open), or the broker did not answer in time.

The rows come in any order (``relay.reconcile_rows`` pages them in id order); the checker
takes them a chunk at a time, groups a chunk by partition and sorts each group by offset, so
each partition is read forward and memory holds one chunk whatever the window. The records
come from a ``RecordSource``: ``relay.kafka.KafkaRecordSource`` reads a chunk's partitions of
a topic together, each forward; tests use an in-memory one.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import itemgetter
from typing import Any, NamedTuple, Protocol, cast

from .selection import key_text

OK, MISSING, MISMATCHED, EXPIRED, UNREADABLE = (
    "ok",
    "missing",
    "mismatched",
    "expired",
    "unreadable",
)
CATEGORIES = (OK, MISSING, MISMATCHED, EXPIRED, UNREADABLE)

#: Exit codes for a cron job or a probe (0, 1 and 2 as every command: ok, problems, usage).
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_UNCHECKED = 0, 1, 2, 3

#: Rows checked at a time: grouped by partition, sorted by offset, then read from Kafka. Ids
#: grow with time, so a chunk's rows of one partition lie close together in its log; the
#: chunk bounds the rows held (about 150 bytes each with their objects).
CHUNK = 50_000


class Row(NamedTuple):
    """A CONFIRMED row as the table records it. A tuple: built straight from the database's
    row (``tuple.__new__``), no per-row constructor."""

    id: int
    message_id: str  # as in the Kafka header: the UUID's text
    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    digest: bytes  # SHA-256 of the payload


class Record(NamedTuple):
    """A record as Kafka holds it (the payload by its digest only)."""

    message_id: bytes | None  # the first `message_id` header's value, None if it has none
    key: bytes | None
    digest: bytes

    @classmethod
    def of(cls, key: bytes | None, value: bytes | None, headers: Any) -> Record:
        """From a consumed record's parts (headers: confluent-kafka's list of pairs)."""
        message_id = None
        for name, found in headers or ():
            if name == "message_id":
                message_id = found.encode() if isinstance(found, str) else found
                break
        # A record without a value (a tombstone) is no row's message: no digest matches b"".
        return cls(message_id, key, hashlib.sha256(value).digest() if value is not None else b"")


class Absent(Exception):
    """The topic or partition does not exist."""


class Unavailable(Exception):
    """The records cannot be read now (a broker error, no answer before the deadline)."""


class RecordSource(Protocol):
    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        """The partition's first offset and its end (the offset the next record will get).
        Raises Absent or Unavailable."""
        ...

    def cleanup_policy(self, topic: str) -> str:
        """The topic's cleanup.policy (``delete``, ``compact`` or ``compact,delete``). Raises
        Unavailable (saying why) when it cannot be read, e.g. DescribeConfigs not allowed."""
        ...

    def read(
        self, topic: str, wanted: Mapping[int, Sequence[int]]
    ) -> Iterator[tuple[int, int, Record | Unavailable | None]]:
        """WANTED: offsets by partition (each list ascending, distinct, between the partition's
        watermarks). For each of them, in order within its partition (partitions may
        interleave): (partition, offset, the committed record at it), the record None when
        the log holds none there (skipped by a read_committed reader). A partition whose rest
        cannot be read gives (partition, -1, Unavailable(why)) and nothing more (the offset -1
        says so: one comparison of an int in the checker's loop). Raises Unavailable when no
        partition can be read further."""
        ...


@dataclass(frozen=True, slots=True)
class Problem:
    row: Row
    problem: str
    detail: str
    fields: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        r = self.row
        return {
            "id": r.id,
            "message_id": r.message_id,
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "key": key_text(r.key) if r.key is not None else None,
            "problem": self.problem,
            "fields": list(self.fields),
            "detail": self.detail,
        }


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    #: Problem rows in the order checked (chunk by chunk; in a chunk, partition by partition
    #: and by offset), up to max_listed; the counts hold every one.
    problems: list[Problem] = field(default_factory=list)
    max_listed: int = 100_000

    @property
    def checked(self) -> int:
        return sum(self.counts.values())

    @property
    def truncated(self) -> bool:
        return len(self.problems) < self.checked - self.counts[OK]

    def add_ok(self, n: int) -> None:
        self.counts[OK] += n

    def add(self, problem: Problem | None) -> None:
        if problem is None:
            self.counts[OK] += 1
            return
        self.counts[problem.problem] += 1
        if len(self.problems) < self.max_listed:
            self.problems.append(problem)

    def exit_code(self) -> int:
        """1 when a row is missing or mismatched (whatever else), else 3 when some row could
        not be checked, else 0."""
        if self.counts[MISSING] or self.counts[MISMATCHED]:
            return EXIT_PROBLEMS
        if self.counts[EXPIRED] or self.counts[UNREADABLE]:
            return EXIT_UNCHECKED
        return EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "counts": dict(self.counts),
            "problems": [p.as_dict() for p in self.problems],
            "problems_truncated": self.truncated,
            "exit_code": self.exit_code(),
        }


def compare(row: Row, record: Record) -> Problem | None:
    """None when RECORD is ROW's message, else which fields differ."""
    differ = []
    detail = []
    if record.message_id != row.message_id.encode():
        differ.append("message_id")
        found = record.message_id
        detail.append(
            "no message_id header"
            if found is None
            else f"message_id {found.decode('utf-8', 'backslashreplace')[:64]}"
        )
    if record.key != row.key:
        differ.append("key")
        detail.append(f"key {key_text(record.key)[:64]}")
    if record.digest != row.digest:
        differ.append("payload")
        detail.append("another payload")
    if not differ:
        return None
    return Problem(row, MISMATCHED, "the record there has " + ", ".join(detail), tuple(differ))


class Reconciler:
    """Checks rows, given in any order, against a RecordSource, CHUNK rows at a time; PROGRESS
    is called with the number of rows done, after each partition of a chunk."""

    def __init__(
        self,
        source: RecordSource,
        *,
        max_listed: int = 100_000,
        progress: Callable[[int], None] | None = None,
        chunk: int = CHUNK,
    ):
        self.source = source
        self.report = Report(max_listed=max_listed)
        self._progress = progress
        self._chunk = max(1, chunk)
        # Per partition: (first offset, end), or why it cannot be read. Read at its first row,
        # and again when a later row lies at or beyond the end read then: rows are read from
        # the database after that, and a row confirmed since may hold a newer offset. A row
        # reaches the database after Kafka acknowledged its offset, so an offset at or beyond
        # an end read after the row is not a record still on its way.
        self._marks: dict[tuple[str, int], tuple[int, int] | Problem] = {}
        # Per topic: the category and detail of a row whose offset holds no committed record,
        # from the topic's cleanup.policy, asked at the first such row.
        self._no_record: dict[str, tuple[str, str]] = {}

    def check(self, rows: Iterable[Row]) -> Report:
        it = iter(rows)
        while True:  # bounded: each pass takes rows from a finite iterator, or ends
            groups = _by_place(list(islice(it, self._chunk)))
            if not groups:
                return self.report
            self._check_chunk(groups)
            if self._progress:
                for size in [len(group) for group in groups.values()]:
                    self._progress(size)
            # The next chunk is built once these rows are gone (tests/unit: rows alive).
            del groups

    def _check_chunk(self, groups: dict[tuple[str, int | None], list[Row]]) -> None:
        # Each topic's partitions are read together, as a consumer of the topic does.
        by_topic: dict[str, dict[int, list[Row]]] = {}
        for (topic, partition), rows in groups.items():
            wanted = self._placed(topic, partition, rows)
            if wanted and partition is not None:
                by_topic.setdefault(topic, {})[partition] = wanted
        for topic, wanted_rows in by_topic.items():
            self._compare_all(topic, wanted_rows)

    def _placed(self, topic: str, partition: int | None, rows: list[Row]) -> list[Row]:
        """The rows of one partition that its log can hold, sorted by offset; the others
        reported (no place, expired, missing, or the partition cannot be read)."""
        add = self.report.add
        if partition is None:
            for row in rows:
                add(Problem(row, UNREADABLE, _NO_PLACE))
            return []
        placed = [row for row in rows if row[4] is not None]
        if len(placed) < len(rows):
            for row in rows:
                if row[4] is None:
                    add(Problem(row, UNREADABLE, _NO_PLACE))
            if not placed:
                return []
        placed.sort(key=_OFFSET)
        marks = self._watermarks(topic, partition, placed[0])
        if not isinstance(marks, Problem) and cast(int, placed[-1][4]) >= marks[1]:
            marks = self._watermarks(topic, partition, placed[0], fresh=True)
        if isinstance(marks, Problem):
            for row in placed:
                add(Problem(row, marks.problem, marks.detail))
            return []
        low, end = marks
        first = bisect_left(placed, low, key=_OFFSET)
        beyond = bisect_left(placed, end, key=_OFFSET)
        expired = f"deleted by retention: the partition starts at offset {low}"
        for row in placed[:first]:
            add(Problem(row, EXPIRED, expired))
        for row in placed[beyond:]:
            add(Problem(row, MISSING, f"beyond the partition's end (offset {end})"))
        return placed[first:beyond]

    def _compare_all(self, topic: str, wanted: dict[int, list[Row]]) -> None:
        """The rows of WANTED (by partition, each sorted by offset) against the records at
        their offsets; each offset is read once, however many rows name it.

        The hot loop: a reader hands out a partition's records in runs, so the partition's
        state lives in local variables and is saved only when the partition changes; a row
        is compared field by field, and a Problem is made only for a row that is not ok."""
        add = self.report.add
        offsets = {
            p: cast(list[int], list(dict.fromkeys([row[4] for row in rows])))
            for p, rows in wanted.items()
        }
        # Per partition: [the next row, the next offset], both as indexes.
        saved = {p: [0, 0] for p in wanted}
        current: int | None = None
        rows: list[Row] = []
        offs: list[int] = []
        k = done = n = ok = 0
        try:
            for partition, offset, record in self.source.read(topic, offsets):
                if partition != current:
                    if current is not None:
                        saved[current] = [k, done]
                    if partition not in saved:
                        raise Unavailable(f"the reader answered partition {partition}, unasked")
                    current, rows, offs = partition, wanted[partition], offsets[partition]
                    (k, done), n = saved[partition], len(rows)
                if offset < 0:  # the rest of the partition cannot be read: record says why
                    for row in rows[k:]:
                        add(Problem(row, UNREADABLE, str(record)))
                    k, done = n, len(offs)
                    continue
                if done >= len(offs) or offset != offs[done]:
                    raise Unavailable(f"the reader answered offset {offset} out of order")
                done += 1
                while k < n and rows[k][4] == offset:  # once, but for rows sharing an offset
                    row = rows[k]
                    k += 1
                    if record is None:
                        add(Problem(row, *self._skipped(topic)))
                    elif (  # a Record here: an Unavailable comes with offset -1 (above)
                        record[2] == row[6]  # type: ignore[index]
                        and record[1] == row[5]  # type: ignore[index]
                        and record[0] == row[1].encode()  # type: ignore[index]
                    ):
                        ok += 1
                    else:
                        add(compare(row, record))  # type: ignore[arg-type]
            if current is not None:
                saved[current] = [k, done]
            for partition, (k, _) in saved.items():
                for row in wanted[partition][k:]:
                    add(Problem(row, UNREADABLE, "the reader stopped early"))
        except Unavailable as exc:
            if current is not None:
                saved[current] = [k, done]
            for partition, (k, _) in saved.items():
                for row in wanted[partition][k:]:
                    add(Problem(row, UNREADABLE, str(exc)))
        finally:
            self.report.add_ok(ok)

    def _skipped(self, topic: str) -> tuple[str, str]:
        """What a row of TOPIC is when its offset holds no committed record. Compaction
        removes records on a compacted topic only: on any other, the offset holds an aborted
        transaction's record or a transaction marker, and the row's message was never
        committed there: missing, not merely unread."""
        found = self._no_record.get(topic)
        if found is None:
            try:
                policy = self.source.cleanup_policy(topic)
            except Unavailable as exc:
                why = f"the topic's cleanup.policy could not be read: {exc}"
                found = (UNREADABLE, f"{_NO_RECORD_ANY}; {why}")
            else:
                if "compact" in policy.replace(" ", "").split(","):
                    found = (UNREADABLE, f"{_NO_RECORD_ANY}; the topic is compacted")
                else:
                    found = (MISSING, _NO_RECORD)
            self._no_record[topic] = found
        return found

    def _watermarks(
        self, topic: str, partition: int, row: Row, *, fresh: bool = False
    ) -> tuple[int, int] | Problem:
        place = (topic, partition)
        if fresh or place not in self._marks:
            try:
                self._marks[place] = self.source.watermarks(topic, partition)
            except Absent as exc:
                self._marks[place] = Problem(row, MISSING, str(exc))
            except Unavailable as exc:
                self._marks[place] = Problem(row, UNREADABLE, str(exc))
        return self._marks[place]


_NO_PLACE = "no recorded partition and offset (confirmed from exactly-once progress records)"
_NO_RECORD = "no committed record at this offset (an aborted transaction or a control record)"
_NO_RECORD_ANY = (
    "no committed record at this offset (a record of an aborted transaction, a transaction "
    "marker, or removed by compaction)"
)

_OFFSET = itemgetter(4)


def _by_place(chunk: list[Row]) -> dict[tuple[str, int | None], list[Row]]:
    """CHUNK's rows by (topic, partition), in the order met. A function of its own: no
    variable of the caller keeps a row of this chunk alive while the next one is built."""
    groups: dict[tuple[str, int | None], list[Row]] = {}
    for row in chunk:
        place = (row[2], row[3])
        group = groups.get(place)
        if group is None:
            groups[place] = [row]
        else:
            group.append(row)
    return groups
