"""The database side of `outbox reconcile`: the window's rows, a page at a time.

Pages follow the primary key (keyset: ``id > after ORDER BY id LIMIT page``), each its own
short statement: nothing is materialised or sorted on the server, no snapshot is held while
Kafka is read, and the client holds a page. ``--sample`` and ``--limit`` pick their N ids
first (one statement, a sort of N), then read those rows a page of ids at a time. Progress is
the share of the id range (or of the picked ids) passed: no count of the window beforehand.

``RowPages.pages`` runs on the prefetch thread (relay.prefetch), which owns the connection
while it runs; the constructor's queries run on the caller's thread, before.
"""

from __future__ import annotations

import datetime as dt
from array import array
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg

from outbox.sql import compose, one_row, read_blocks

from .reconcile import CHUNK, Row
from .selection import Selection, key_text

#: Rows a page statement returns at most.
PAGE = 10_000
#: Ids a page statement reads at most: a narrow window (a recent --since in a long table, a
#: rare --key) returns few rows per id read, and its statements must end soon all the same.
SPAN = 500_000

#: Pages read ahead while a chunk is checked: a chunk's worth, so that the next chunk is
#: ready when this one is done (with 2 pages, the checker waited 0.3 s more for 200,000 rows).
#: Rows held at most: the chunk being checked, AHEAD pages queued, one being read and the
#: rest of the page the chunk was cut from: 50,000 + 8 x 10,000 = 130,000 rows (about 60 MB;
#: tests/unit/test_reconcile.py counts them).
AHEAD = CHUNK // PAGE + 1

#: A page: the progress reached at its end (in RowPages.total's units), and its rows.
Page = tuple[int, list[Row]]

# Straight from the database's row tuple: no per-row Python constructor.
_make_row = partial(tuple.__new__, Row)


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


class Pager:
    """Rows in pages. TOTAL is the progress's length; POSITION the progress of the last page
    handed to the reader by rows(). pages() may run on another thread (relay.prefetch)."""

    total = 0
    position = 0

    def pages(self) -> Generator[Page, None, None]:
        raise NotImplementedError

    def rows(self, pages: Iterable[Page]) -> Iterator[Row]:
        """The rows of PAGES, one after another, keeping POSITION up to date."""
        for position, rows in pages:
            self.position = position
            yield from rows


class RowPages(Pager):
    """The window's rows in pages: TOTAL counts the ids of the table's range, or the ids
    picked by --sample or --limit."""

    def __init__(
        self,
        conn: psycopg.Connection,
        schema: str,
        window: Window,
        *,
        page: int = PAGE,
        span: int = SPAN,
    ):
        self._conn, self._page, self._span = conn, page, span
        blocks = read_blocks("relay", "reconcile.sql")
        where, params = Selection(topic=window.topic, key=window.key).where()
        in_window = compose(blocks["in_window"], schema, where=where)
        self._params = {**params, "since": window.since, "until": window.until}
        self._after = compose(blocks["page_after"], schema, in_window=in_window)
        self._of_ids = compose(blocks["page_of_ids"], schema, in_window=in_window)
        self._ids: array[int] | None = None
        self._first = self._last = 0
        count = window.sample or window.limit
        if count is not None:
            pick = "pick_sample" if window.sample is not None else "pick_latest"
            picked = compose(blocks[pick], schema, in_window=in_window)
            # Kept as 8 bytes an id: --sample 10,000,000 holds 80 MB here, not 400.
            self._ids = array("q")
            for (row_id,) in conn.cursor().stream(picked, {**self._params, "count": count}):
                self._ids.append(row_id)
            self.total = len(self._ids)
        else:
            low, high = one_row(conn.execute(compose(blocks["id_range"], schema)))
            if low is not None:  # else an empty table: no page at all
                self._first, self._last = low, high
            self.total = self._last - self._first + 1 if low is not None else 0

    def pages(self) -> Generator[Page, None, None]:
        """Every page, in order (run on the prefetch thread)."""
        if self.total == 0:
            return
        # This connection runs the pages only, from here on (see page_after).
        self._conn.execute("SET enable_sort = off")
        cur = self._conn.cursor(binary=True, row_factory=lambda _cur: _make_row)
        if self._ids is not None:
            for lo in range(0, len(self._ids), self._page):
                ids = self._ids[lo : lo + self._page].tolist()
                rows = cur.execute(self._of_ids, {**self._params, "ids": ids}).fetchall()
                yield lo + len(ids), rows
            return
        after = self._first - 1
        while after < self._last:  # bounded: after grows every page, up to _last
            last = min(self._last, after + self._span)
            params = {**self._params, "after": after, "last": last, "page": self._page}
            rows = cur.execute(self._after, params).fetchall()
            # A full page may stop short of LAST; a short one read every id up to it.
            after = rows[-1][0] if len(rows) == self._page else last
            yield after - self._first + 1, rows

    def cancel(self) -> None:
        """Cancel the statement in flight (from another thread: libpq's cancel request)."""
        self._conn.cancel_safe()


def read_all(conn: psycopg.Connection, schema: str, window: Window) -> Iterator[Row]:
    """Every row of WINDOW on this thread, without prefetch (the benchmark's database side)."""
    pages = RowPages(conn, schema, window)
    return pages.rows(pages.pages())
