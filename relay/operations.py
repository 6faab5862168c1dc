"""What the operator commands do to the table: list, show, replay, skip, purge, audit.

Every change is made in small batches, each in its own short transaction together with its
audit row, so a large replay never holds long locks and the audit trail matches what happened.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

import outbox.sql
from outbox.message import headers_from_json
from outbox.sql import compose, named_blocks, one_row, read_blocks

from .model import BUCKETS
from .selection import Selection
from .store import int_array

BATCH = 1000
ALL_BUCKETS = int_array(range(BUCKETS))
Progress = Callable[[int], None]


def _q(name: str, schema: str, selection: Selection | None = None):
    body = read_blocks("relay", "operations.sql")[name]
    parts = named_blocks("relay", "operations.sql", name, schema)
    if selection is None:
        return compose(body, schema, **parts), {}
    where, params = selection.where()
    return compose(body, schema, where=where, **parts), params


def list_rows(
    conn: psycopg.Connection, schema: str, selection: Selection, limit: int = 50, after_id: int = 0
) -> list[dict[str, Any]]:
    where, params = selection.where()
    query = compose(
        read_blocks("relay", "operations.sql")["list_rows"],
        schema,
        where=where,
        blocking_keys=outbox.sql.query("relay", "queries.sql", "blocking_keys", schema),
    )
    params = {**params, "limit": limit, "after_id": after_id, "buckets": ALL_BUCKETS}
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def count_rows(conn: psycopg.Connection, schema: str, selection: Selection) -> dict[str, int]:
    query, params = _q("count_rows", schema, selection)
    return dict(conn.execute(query, params).fetchall())


def count_changeable(
    conn: psycopg.Connection, schema: str, selection: Selection, action: str
) -> int:
    """How many selected rows ACTION ('replay' or 'skip') would change now: the same rule
    as the change itself (operations.sql's replayable and skippable)."""
    name = {"replay": "count_replayable", "skip": "count_skippable"}[action]
    query, params = _q(name, schema, selection)
    return one_row(conn.execute(query, params))[0]


def get_row(conn: psycopg.Connection, schema: str, ref: int | uuid.UUID) -> dict[str, Any] | None:
    query, _ = _q("get_row", schema)
    params = {
        "id": ref if isinstance(ref, int) else -1,
        "message_id": ref if isinstance(ref, uuid.UUID) else None,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query, params).fetchone()
    if row is None:
        return None
    row["headers"] = headers_from_json(row["headers"])
    row["held_behind"] = 0
    if row["key"] is not None and row["status"] in ("FAILED", "PENDING"):
        held, _ = _q("rows_held_behind", schema)
        row["held_behind"] = one_row(conn.execute(held, {"key": row["key"], "id": row["id"]}))[0]
    return row


def _batched(
    conn: psycopg.Connection,
    name: str,
    schema: str,
    selection: Selection,
    actor: str,
    reason: str | None,
    progress: Progress | None,
) -> list[int]:
    query, params = _q(name, schema, selection)
    params = {
        **params,
        "actor": actor,
        "reason": reason,
        "selection": json.dumps(selection.describe()),
        "limit": BATCH,
    }
    changed: list[int] = []
    after = 0
    while True:  # bounded: every batch moves `after` past the rows it took, or ends the loop
        with conn.transaction():
            ids = one_row(conn.execute(query, {**params, "after_id": after}))[0]
        if not ids:
            return changed
        changed.extend(ids)
        after = ids[-1]
        if progress:
            progress(len(ids))


def replay(
    conn: psycopg.Connection,
    schema: str,
    selection: Selection,
    actor: str,
    reason: str | None = None,
    progress: Progress | None = None,
) -> list[int]:
    """Put the selected FAILED, SKIPPED, CONFIRMED, backed-off PENDING and expired SENT rows back
    to PENDING with attempts and backoff cleared; return their ids."""
    return _batched(conn, "replay_batch", schema, selection, actor, reason, progress)


def skip(
    conn: psycopg.Connection,
    schema: str,
    selection: Selection,
    actor: str,
    reason: str | None = None,
    progress: Progress | None = None,
) -> list[int]:
    """Mark the selected FAILED rows SKIPPED (on purpose, audited): their keys flow again."""
    return _batched(conn, "skip_batch", schema, selection, actor, reason, progress)


def purge_count(
    conn: psycopg.Connection, schema: str, statuses: list[str], cutoff: dt.datetime
) -> int:
    query, _ = _q("purge_count", schema)
    return one_row(conn.execute(query, {"statuses": statuses, "cutoff": cutoff}))[0]


def purge(
    conn: psycopg.Connection,
    schema: str,
    statuses: list[str],
    cutoff: dt.datetime,
    actor: str,
    reason: str | None = None,
    progress: Progress | None = None,
) -> int:
    """Delete CONFIRMED (and SKIPPED, if in STATUSES) rows created before CUTOFF."""
    if set(statuses) - {"CONFIRMED", "SKIPPED"}:
        raise ValueError("purge deletes CONFIRMED and SKIPPED rows only")
    query, _ = _q("purge_batch", schema)
    deleted = 0
    while True:  # bounded: each round deletes up to BATCH rows or ends the loop
        with conn.transaction():
            n = conn.execute(
                query, {"statuses": statuses, "cutoff": cutoff, "limit": BATCH}
            ).rowcount
        deleted += n
        if progress and n:
            progress(n)
        if n < BATCH:
            break
    audit, _ = _q("audit_purge", schema)
    with conn.transaction():
        conn.execute(
            audit,
            {
                "actor": actor,
                "reason": reason,
                "affected": deleted,
                "selection": json.dumps(
                    {"statuses": statuses, "created_before": cutoff.isoformat()}
                ),
            },
        )
    return deleted


def audit_log(conn: psycopg.Connection, schema: str, limit: int = 50) -> list[dict[str, Any]]:
    query, _ = _q("audit_log", schema)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, {"limit": limit}).fetchall()


def blocked_keys(conn: psycopg.Connection, schema: str, limit: int = 20) -> list[dict[str, Any]]:
    query, _ = _q("blocked_keys", schema)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, {"limit": limit}).fetchall()


def blocked_key_count(conn: psycopg.Connection, schema: str) -> int:
    query, _ = _q("blocked_key_count", schema)
    return one_row(conn.execute(query))[0]
