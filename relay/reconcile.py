"""`outbox reconcile`: does Kafka hold, at each CONFIRMED row's recorded place, that row's message?

For each row, the record at its topic, partition and offset must carry the row's `message_id`
header, its key and its payload (compared by SHA-256). Every row ends in one category:

- ``ok``;
- ``mismatched``: a record is there but another message_id, key or payload (``fields`` says
  which);
- ``missing``: no such topic or partition, or the offset is at or beyond the partition's end;
- ``expired``: the offset is below the partition's first offset: deleted by retention, so it
  cannot be checked;
- ``unreadable``: it could not be checked: no recorded place (rows confirmed from exactly-once
  progress records have none), no committed record at the offset (an aborted transaction's
  record, a transaction marker, a record removed by compaction), an offset beyond the last
  stable offset (a transaction still open), or the broker did not answer in time.

The records come from a ``RecordSource``: ``relay.kafka.KafkaRecordSource`` reads them, one
partition at a time, forward; tests use an in-memory one. The rows come from the database in
Kafka's order (``open_rows``), page by page, so memory stays bounded whatever the window.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import sql

from outbox.sql import compose, read_blocks

from .selection import Selection, key_text

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

#: Rows fetched from the database at a time, and handed to the source at a time per partition.
PAGE = 5000


@dataclass(frozen=True, slots=True)
class Row:
    """A CONFIRMED row as the table records it."""

    id: int
    message_id: str  # as in the Kafka header: the UUID's text
    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    digest: bytes  # SHA-256 of the payload


@dataclass(frozen=True, slots=True)
class Record:
    """A record as Kafka holds it (the payload by its digest only)."""

    message_id: bytes | None  # the first `message_id` header's value, None if it has none
    key: bytes | None
    digest: bytes

    @classmethod
    def of(cls, key: bytes | None, value: bytes | None, headers: Any) -> Record:
        """From a consumed record's parts (headers: confluent-kafka's list of pairs)."""
        message_id = next((v for k, v in headers or () if k == "message_id"), None)
        if isinstance(message_id, str):
            message_id = message_id.encode()
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

    def read(
        self, topic: str, partition: int, offsets: Sequence[int]
    ) -> Iterator[tuple[int, Record | None]]:
        """For each of OFFSETS (ascending, distinct, each between the watermarks), in order:
        the committed record at it, or None when the log holds none there (skipped by a
        read_committed reader). Raises Unavailable when the rest cannot be read."""
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
    #: Problem rows in Kafka's order, up to max_listed; the counts hold every one.
    problems: list[Problem] = field(default_factory=list)
    max_listed: int = 100_000

    @property
    def checked(self) -> int:
        return sum(self.counts.values())

    @property
    def truncated(self) -> bool:
        return len(self.problems) < self.checked - self.counts[OK]

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
    """Checks rows, given in Kafka's order, against a RecordSource; PROGRESS is called with the
    number of rows done now and then."""

    def __init__(
        self,
        source: RecordSource,
        *,
        max_listed: int = 100_000,
        progress: Callable[[int], None] | None = None,
        chunk: int = PAGE,
    ):
        self.source = source
        self.report = Report(max_listed=max_listed)
        self._progress = progress
        self._chunk = chunk
        # Per partition: (first offset, end), or why it cannot be read. Read once, at its first
        # row: every row's offset was acknowledged before the rows were selected, which was
        # before this, so an offset at or beyond the end is not a record still on its way.
        self._marks: dict[tuple[str, int], tuple[int, int] | Problem] = {}

    def check(self, rows: Iterable[Row]) -> Report:
        for (topic, partition), group in itertools.groupby(rows, _place):
            while chunk := list(itertools.islice(group, self._chunk)):
                self._check_chunk(topic, partition, chunk)
                if self._progress:
                    self._progress(len(chunk))
        return self.report

    def _check_chunk(self, topic: str, partition: int | None, rows: list[Row]) -> None:
        add = self.report.add
        if partition is None:
            for row in rows:
                add(Problem(row, UNREADABLE, _NO_PLACE))
            return
        marks = self._watermarks(topic, partition, rows[0])
        if isinstance(marks, Problem):
            for row in rows:
                add(Problem(row, marks.problem, marks.detail))
            return
        low, end = marks
        wanted: dict[int, list[Row]] = {}
        for row in rows:
            offset = row.offset
            if offset is None:
                add(Problem(row, UNREADABLE, _NO_PLACE))
            elif offset < low:
                add(
                    Problem(
                        row,
                        EXPIRED,
                        f"deleted by retention: the partition starts at offset {low}",
                    )
                )
            elif offset >= end:
                add(Problem(row, MISSING, f"beyond the partition's end (offset {end})"))
            else:
                wanted.setdefault(offset, []).append(row)
        if not wanted:
            return
        offsets = sorted(wanted)
        done = 0
        try:
            for offset, record in self.source.read(topic, partition, offsets):
                if done >= len(offsets) or offset != offsets[done]:
                    raise Unavailable(f"the reader answered offset {offset} out of order")
                for row in wanted[offset]:
                    add(
                        compare(row, record)
                        if record is not None
                        else Problem(row, UNREADABLE, _NO_RECORD)
                    )
                done += 1
            if done < len(offsets):
                raise Unavailable("the reader stopped early")
        except Unavailable as exc:
            for offset in offsets[done:]:
                for row in wanted[offset]:
                    add(Problem(row, UNREADABLE, str(exc)))

    def _watermarks(self, topic: str, partition: int, row: Row) -> tuple[int, int] | Problem:
        place = (topic, partition)
        if place not in self._marks:
            try:
                self._marks[place] = self.source.watermarks(topic, partition)
            except Absent as exc:
                self._marks[place] = Problem(row, MISSING, str(exc))
            except Unavailable as exc:
                self._marks[place] = Problem(row, UNREADABLE, str(exc))
        return self._marks[place]


_NO_PLACE = "no recorded partition and offset (confirmed from exactly-once progress records)"
_NO_RECORD = (
    "no committed record at this offset (a record of an aborted transaction, a transaction "
    "marker, or removed by compaction)"
)


def _place(row: Row) -> tuple[str, int | None]:
    return (row.topic, row.partition)


# --------------------------------------------------------------------------- the database side

_CURSOR = sql.Identifier("outbox_reconcile_rows")


def _block(name: str, schema: str, **fragments: sql.Composable) -> sql.Composed:
    return compose(read_blocks("relay", "reconcile.sql")[name], schema, cursor=_CURSOR, **fragments)


@dataclass(frozen=True)
class Window:
    """Which CONFIRMED rows to check: delivered in [since, until), of a topic or a key, all of
    them or a random sample or the latest."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    topic: str | None = None
    key: bytes | None = None
    sample: int | None = None
    limit: int | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("since", "until", "topic", "key", "sample", "limit"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, dt.datetime):
                value = value.isoformat()
            elif isinstance(value, bytes):
                value = key_text(value)
            out[name] = value
        return out


class Rows:
    """The window's rows, selected once on the server (a cursor WITH HOLD) and fetched a page
    at a time. Use as a context manager: the cursor is closed at the end."""

    def __init__(self, conn: psycopg.Connection, schema: str, window: Window):
        self._conn, self._schema = conn, schema
        where, params = Selection(topic=window.topic, key=window.key).where()
        pick: sql.Composable = sql.SQL("")
        count = window.sample or window.limit
        if window.sample is not None:
            pick = sql.SQL(read_blocks("relay", "reconcile.sql")["pick_sample"])
        elif window.limit is not None:
            pick = sql.SQL(read_blocks("relay", "reconcile.sql")["pick_latest"])
        conn.execute(
            _block("open_rows", schema, where=where, pick=pick),
            {**params, "since": window.since, "until": window.until, "count": count},
        )
        self.total = conn.execute(_block("count_rows", schema)).rowcount
        conn.execute(_block("rewind", schema))

    def __iter__(self) -> Iterator[Row]:
        fetch = _block("fetch_rows", self._schema, count=sql.Literal(PAGE))
        while True:  # bounded: the cursor's rows are finite and each page moves past its rows
            page = self._conn.execute(fetch).fetchall()
            for r in page:
                yield Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6])
            if len(page) < PAGE:
                return

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._conn.closed:
            try:
                self._conn.execute(_block("close_rows", self._schema))
            except psycopg.Error:
                pass  # the session ends soon after, and the cursor with it
