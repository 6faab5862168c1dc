"""What the operator commands do to the table: list, show, replay, skip, purge, inbox purge,
audit; and the GRANTs each role needs (`outbox grants`).

Every change is made in small batches, each in its own short transaction together with its
audit entry, so a large replay never holds long locks and the audit trail matches what
happened. Each batch takes the audit trail's turn first (audit_turn): appends to the hash
chain are serialised, and always before any row lock, so two operators cannot deadlock.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row

import outbox.sql
from outbox.inbox import purge_inbox
from outbox.message import headers_from_json
from outbox.sql import compose, named_blocks, one_row, read_blocks, validate_identifier

from .audit import Report, check_chain, entry_link
from .model import BUCKETS
from .selection import Selection, SelectionError
from .store import int_array

BATCH = 1000
ALL_BUCKETS = int_array(range(BUCKETS))
Progress = Callable[[int], None]

#: What the audit trail records (the CHECK on its action column).
AUDIT_ACTIONS = ("replay", "skip", "purge", "inbox-purge")

#: The roles grants.sql has a block of least privileges for.
GRANT_ROLES = ("relay", "writer", "operator", "consumer")


def _q(name: str, schema: str, selection: Selection | None = None):
    body = read_blocks("relay", "operations.sql")[name]
    parts = named_blocks("relay", "operations.sql", name, schema)
    if selection is None:
        return compose(body, schema, **parts), {}
    where, params = selection.where()
    # Only a selection that names SCHEDULED may cancel scheduled rows (operations.sql,
    # skippable).
    params["cancel_scheduled"] = "SCHEDULED" in selection.statuses
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


def check_change(action: str, selection: Selection) -> None:
    """Refuse, before anything is read, a change that cannot mean anything: a change of no
    selection at all (every row), a skip of other rows than FAILED and SCHEDULED ones, and a
    replay of SCHEDULED rows (they are on their way, at their time)."""
    if selection.is_empty():
        raise SelectionError(f"say what to {action}: ids, --status, --topic, --key, --since ...")
    if action == "skip" and set(selection.statuses) - {"FAILED", "SCHEDULED"}:
        raise SelectionError(
            "skip changes FAILED rows, and SCHEDULED rows (cancelled) with --status SCHEDULED"
        )
    if action == "replay" and "SCHEDULED" in selection.statuses:
        raise SelectionError(
            "replay does not change SCHEDULED rows: they are delivered when they fall due "
            "(`outbox skip --status SCHEDULED` cancels them)"
        )


def purge_statuses(include_skipped: bool) -> list[str]:
    """What a purge may delete: CONFIRMED rows, and SKIPPED ones if asked; never a row still
    to deliver."""
    return ["CONFIRMED"] + (["SKIPPED"] if include_skipped else [])


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
        row["held_behind"] = one_row(
            conn.execute(held, {"key": row["key"], "tenant": row["tenant"], "id": row["id"]})
        )[0]
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
    turn, _ = _q("audit_turn", schema)
    changed: list[int] = []
    after = 0
    while True:  # bounded: every batch moves `after` past the rows it took, or ends the loop
        with conn.transaction():
            conn.execute(turn, {"schema": schema})
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
    to PENDING with attempts and backoff cleared (to SCHEDULED if their deliver_at is still
    ahead); return their ids."""
    return _batched(conn, "replay_batch", schema, selection, actor, reason, progress)


def skip(
    conn: psycopg.Connection,
    schema: str,
    selection: Selection,
    actor: str,
    reason: str | None = None,
    progress: Progress | None = None,
) -> list[int]:
    """Mark the selected FAILED rows SKIPPED (on purpose, audited): their keys flow again. With
    SCHEDULED among the selection's statuses, the selected SCHEDULED rows too: cancelled
    before they fall due."""
    return _batched(conn, "skip_batch", schema, selection, actor, reason, progress)


def purge_count(
    conn: psycopg.Connection,
    schema: str,
    statuses: list[str],
    cutoff: dt.datetime,
    tenant: str | None = None,
) -> int:
    """How many rows purge() would delete; TENANT: only that tenant's ('' for none)."""
    query, _ = _q("purge_count", schema)
    params = {"statuses": statuses, "cutoff": cutoff, "tenant": tenant}
    return one_row(conn.execute(query, params))[0]


def purge(
    conn: psycopg.Connection,
    schema: str,
    statuses: list[str],
    cutoff: dt.datetime,
    actor: str,
    reason: str | None = None,
    progress: Progress | None = None,
    tenant: str | None = None,
) -> int:
    """Delete CONFIRMED (and SKIPPED, if in STATUSES) rows created before CUTOFF (of TENANT
    only, if given), each batch with its audit entry."""
    if set(statuses) - {"CONFIRMED", "SKIPPED"}:
        raise ValueError("purge deletes CONFIRMED and SKIPPED rows only")
    turn, _ = _q("audit_turn", schema)
    query, _ = _q("purge_batch", schema)
    params = {
        "statuses": statuses,
        "cutoff": cutoff,
        "limit": BATCH,
        "actor": actor,
        "reason": reason,
        "tenant": tenant,
        "selection": json.dumps(
            {"statuses": statuses, "created_before": cutoff.isoformat()}
            | ({} if tenant is None else {"tenant": tenant})
        ),
    }
    deleted = 0
    while True:  # bounded: each round deletes up to BATCH rows or ends the loop
        with conn.transaction():
            conn.execute(turn, {"schema": schema})
            n = one_row(conn.execute(query, params))[0]
        deleted += n
        if progress and n:
            progress(n)
        if n < BATCH:
            break
    return deleted


def inbox_purge(
    conn: psycopg.Connection,
    schema: str,
    older_than: dt.timedelta,
    group: str | None,
    actor: str,
    reason: str | None = None,
    older_than_text: str | None = None,
) -> int:
    """`outbox inbox purge`: outbox.inbox.purge_inbox, with an audit entry in each batch's
    transaction.

    The entry's INSERT takes the audit trail's turn after the batch's inbox row locks (no
    audit_turn first): safe, because whoever holds the turn (a replay, skip or purge batch)
    never waits for inbox rows."""
    audit, _ = _q("audit_inbox_purge", schema)
    selection: dict[str, Any] = {"older_than": older_than_text or str(older_than)}
    if group is not None:
        selection["group"] = group

    def record(batch: psycopg.Connection, deleted: int) -> None:
        if deleted:
            batch.execute(
                audit,
                {
                    "actor": actor,
                    "reason": reason,
                    "affected": deleted,
                    "selection": json.dumps(selection),
                },
            )

    return purge_inbox(conn, older_than, group=group, schema=schema, on_batch=record)


def audit_log(
    conn: psycopg.Connection,
    schema: str,
    limit: int = 50,
    actions: list[str] | None = None,
    actor: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """Audit entries, newest first: of ACTIONS only, by an ACTOR containing that text (any
    case), written at or after SINCE and before UNTIL, when given."""
    query, _ = _q("audit_log", schema)
    params = {
        "limit": limit,
        "actions": actions or None,
        "actor": actor or None,
        "since": since,
        "until": until,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def verify_audit(
    conn: psycopg.Connection, schema: str, expect_head: bytes | None = None, page: int = 5000
) -> Report:
    """Walk the audit chain in id order, in one snapshot, and report what does not fit."""
    snapshot, _ = _q("audit_snapshot", schema)
    chain, _ = _q("audit_chain", schema)
    holders, _ = _q("audit_holders", schema)

    def links():
        after = 0
        while True:  # bounded: every page moves `after` past its last id, or ends the loop
            rows = conn.execute(chain, {"after_id": after, "limit": page}).fetchall()
            yield from (entry_link(*row) for row in rows)
            if len(rows) < page:
                return
            after = rows[-1][0]

    def holding(hashes) -> dict[bytes, int]:
        return {bytes(h): i for h, i in conn.execute(holders, {"hashes": list(hashes)})}

    with conn.transaction():
        conn.execute(snapshot)
        return check_chain(links(), holding, expect_head)


def blocked_keys(conn: psycopg.Connection, schema: str, limit: int = 20) -> list[dict[str, Any]]:
    query, _ = _q("blocked_keys", schema)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, {"limit": limit}).fetchall()


def blocked_key_count(conn: psycopg.Connection, schema: str) -> int:
    query, _ = _q("blocked_key_count", schema)
    return one_row(conn.execute(query))[0]


def grant_statements(schema: str, role: str, kind: str, retention: bool = False) -> list[str]:
    """The least GRANTs ROLE needs to work as KIND (one of GRANT_ROLES) on SCHEMA's tables,
    one text per block of grants.sql; a relay that deletes old rows (retention) needs DELETE
    too. Invalid names are refused (OutboxError) before any text is made."""
    names = [kind] + (["relay_retention"] if retention and kind == "relay" else [])
    blocks = read_blocks("relay", "grants.sql")
    return [
        pgsql.SQL(blocks[name])
        .format(
            schema=pgsql.Identifier(validate_identifier(schema)),
            role=pgsql.Identifier(validate_identifier(role, "role")),
        )
        .as_string(None)
        for name in names
    ]
