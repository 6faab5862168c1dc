"""Looking at rows: `outbox status`, `outbox list`, `outbox show`."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from outbox.schema import require_schema

from ..selection import Selection, key_text, parse_ref
from ..status import OVERDUE_AFTER
from . import render
from .failures import EXIT_CONDITION, Failure, connect, expected_failures
from .options import dsn_option, json_option, schema_option, selection_options


@click.command()
@dsn_option
@schema_option
@json_option
@click.option(
    "--fail-if-lag",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Exit 1 if the oldest claimable PENDING row is older than SECONDS.",
)
@click.option("--fail-if-failed", is_flag=True, help="Exit 1 if any row is FAILED.")
@click.option(
    "--watch",
    type=click.FloatRange(min=1.0),
    default=None,
    metavar="SECONDS",
    help="Refresh every SECONDS (at least 1: each refresh counts the table) until Ctrl-C; "
    "the rates are then over SECONDS; --fail-if-* apply to the last refresh.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="With --watch: stop after COUNT refreshes.",
)
@expected_failures
def status(dsn: str, schema: str, as_json: bool, fail_if_lag, fail_if_failed, watch, count) -> None:
    """Counts by status and topic, lag and delivery rate per topic, blocked keys, relays.

    The lag is the age of the oldest PENDING row that may be sent now: rows waiting for a
    retry, and rows held behind a FAILED or retrying row of their key, are not lag (they show
    as held, and their keys as blocked). The delivery rate counts rows delivered in the last
    minute (with --watch: since the last refresh). For cron jobs and probes, --fail-if-lag
    and --fail-if-failed set the exit code.

    \b
    Examples:
      outbox status
      outbox status --watch 2                             # refresh every 2 s, Ctrl-C stops
      outbox status --json | jq .topics
      outbox status --fail-if-lag 60 --fail-if-failed     # exit 1 when unhealthy
    """
    if watch is None:
        _status_once(dsn, schema, as_json, fail_if_lag, fail_if_failed, 60.0)
        return
    refreshes, problems = 0, []
    try:
        while count is None or refreshes < count:  # Ctrl-C or --count ends it
            if refreshes and not as_json and sys.stdout.isatty():
                click.clear()
            problems = _status_once(
                dsn, schema, as_json, fail_if_lag, fail_if_failed, watch, watching=True
            )
            refreshes += 1
            if count is None or refreshes < count:
                time.sleep(watch)
    except KeyboardInterrupt:
        pass
    if problems:  # as of the last refresh, as without --watch
        sys.exit(EXIT_CONDITION)


def _status_once(
    dsn, schema, as_json, fail_if_lag, fail_if_failed, rate_window, watching=False
) -> list[str]:
    from ..status import health_problems, read_status

    with connect(dsn) as conn:
        report = read_status(conn, schema, rate_window)
    problems = report["problems"] = health_problems(report, fail_if_lag, fail_if_failed)
    if as_json:
        click.echo(json.dumps(render.jsonable(report), indent=None if watching else 2))
    else:
        _print_status(report)
    if problems and not watching:
        sys.exit(EXIT_CONDITION)
    return problems


def _print_status(report: dict[str, Any]) -> None:
    click.echo(f"schema {report['schema']}: version {report['schema_version']}")
    click.echo("  " + "  ".join(f"{st} {n}" for st, n in report["counts"].items()))
    scheduled = report["scheduled"]
    if scheduled["count"] or scheduled["next_due_at"] is not None:
        due_in = scheduled["next_due_in_seconds"]
        click.echo(
            f"scheduled: {scheduled['count']}, next due {scheduled['next_due_at']} "
            + (
                f"(in {render.duration(due_in)})"
                if due_in >= 0
                else "(due now)"
                if due_in > -OVERDUE_AFTER
                else f"(OVERDUE by {render.duration(-due_in)}: no relay is promoting them)"
            )
        )
    click.echo(
        f"lag (oldest PENDING row the relay may send now): "
        f"{render.seconds(report['oldest_pending_age_seconds'])}"
        f"   waiting for a retry: {report['in_backoff']}"
        f"   held behind a blocked key: {report['held']}"
    )
    groups = [(f"topic {topic}", t) for topic, t in report["topics"].items()]
    groups += [(f"tenant {tenant or '(none)'}", t) for tenant, t in report["tenants"].items()]
    for name, t in groups:
        click.echo(
            f"  {name}: "
            + ", ".join(f"{k} {v}" for k, v in t["counts"].items())
            + f"; lag {render.seconds(t['lag_seconds'])}, {t['delivered_per_second']:.1f}/s"
            + (f", {t['held']} held" if t["held"] else "")
        )
    blocked = report["blocked_keys"]
    click.echo(f"keys blocked by a FAILED (or SENT) row: {report['blocked_key_count']}")
    for b in blocked:
        whose = f" (tenant {b['tenant']})" if b["tenant"] else ""
        click.echo(
            f"  key {b['key']}{whose}: FAILED row {b['first_failed']}, {b['held']} rows held "
            f"behind it  (outbox show {b['first_failed']})"
        )
    if report["rate_limits"]:
        click.echo("rate limits (shared by every relay):")
    for limit in report["rate_limits"]:
        click.echo(
            f"  {limit['scope']} {limit['name']}: {limit['rate']:g}/s, burst "
            f"{limit['burst']:g}, {limit['tokens']:.1f} tokens"
            + (
                f"; THROTTLED (held rows back {render.age(limit['held_at'])} ago)"
                if limit["throttled"]
                else ""
            )
        )
    click.echo(f"relays alive: {len(report['relays'])}")
    for r in report["relays"]:
        click.echo(
            f"  {r['name']}: {r['buckets']} buckets, heartbeat {render.age(r['heartbeat_at'])} ago"
        )
    for p in report.get("problems", []):
        click.echo(f"PROBLEM: {p}")


def _deliver_at(row: dict[str, Any]) -> str:
    """A scheduled row's due time, and how far off it is while it waits."""
    if row["deliver_at"] is None:
        return "-"
    if row["status"] == "SCHEDULED":
        return f"{row['deliver_at']} ({render.waits(row)})"
    return str(row["deliver_at"])


@click.command(name="list")
@dsn_option
@schema_option
@selection_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--after-id", type=int, default=0, help="Page on: rows with a larger id.")
@json_option
@expected_failures
def list_command(
    dsn,
    schema,
    refs,
    statuses,
    topic,
    key,
    key_hex,
    tenant,
    since,
    until,
    error,
    expired_claims,
    limit,
    after_id,
    as_json,
) -> None:
    """List messages, oldest first, filtered.

    \b
    Examples:
      outbox list --status FAILED
      outbox list --status PENDING --topic payments --since 2h
      outbox list --key account-42 --limit 20
      outbox list --error MSG_SIZE_TOO_LARGE --json
      outbox list --status CONFIRMED --after-id 120000     # next page
    """
    from ..operations import list_rows

    selection = Selection.from_cli(
        refs, statuses, topic, key, key_hex, since, until, error, expired_claims, tenant
    )
    with connect(dsn) as conn:
        require_schema(conn, schema)
        rows = list_rows(conn, schema, selection, limit, after_id)
    if as_json:
        click.echo(json.dumps(render.jsonable(rows), indent=2))
    elif rows:
        click.echo(
            f"{'ID':>10}  {'STATUS':<9} {'TOPIC':<24} {'KEY':<20} {'TRIES':>5} {'AGE':>7}  "
            f"{'WAITS':<16} LAST ERROR"
        )
        for r in rows:
            err = (r["last_error"] or "").replace("\n", " ")
            click.echo(
                f"{r['id']:>10}  {r['status']:<9} {r['topic'][:24]:<24} "
                f"{key_text(r['key'])[:20]:<20} {r['attempts']:>5} "
                f"{render.age(r['created_at']):>7}  {render.waits(r):<16} {err[:60]}"
            )
        if len(rows) == limit:
            click.echo(f"(more: --after-id {rows[-1]['id']})")
    if not rows:  # like grep: a script can tell "nothing matches" from the exit status
        raise Failure(f"no message matches {render.described(selection)}".strip())


@click.command()
@dsn_option
@schema_option
@click.argument("ref", metavar="ID|MESSAGE_ID")
@json_option
@expected_failures
def show(dsn, schema, ref, as_json) -> None:
    """Show one message whole: payload, headers, attempts, error, where it went.

    \b
    Examples:
      outbox show 1234
      outbox show 01a217f4-2439-76cc-80ca-42a17b83b829
    """
    from ..operations import get_row

    parsed = parse_ref(ref)  # a usage error before any connection
    with connect(dsn) as conn:
        require_schema(conn, schema)
        row = get_row(conn, schema, parsed)
    if row is None:
        raise Failure(f"no message {ref}")
    if as_json:
        out = dict(row)
        out["payload"], out["payload_encoding"] = render.payload_for_json(row["payload"])
        out["headers"] = [[k, key_text(v) if v is not None else None] for k, v in row["headers"]]
        click.echo(json.dumps(render.jsonable(out), indent=2))
        return
    lines = [
        ("id", row["id"]),
        ("message_id", row["message_id"]),
        ("status", row["status"]),
        ("topic", row["topic"]),
        ("key", key_text(row["key"])),
        ("tenant", row["tenant"] or "-"),
        ("bucket", row["bucket"]),
        ("attempts", row["attempts"]),
        ("next attempt", row["next_attempt_at"] or "-"),
        ("last error", row["last_error"] or "-"),
        ("created", f"{row['created_at']} ({render.age(row['created_at'])} ago)"),
        ("delivered", row["delivered_at"] or "-"),
        (
            "kafka",
            f"partition {row['kafka_partition']}, offset {row['kafka_offset']}"
            if row["kafka_offset"] is not None
            else "-",
        ),
        ("dedup key", row["dedup_key"] or "-"),
        ("deliver at", _deliver_at(row)),
    ]
    for name, value in lines:
        click.echo(f"{name + ':':<14}{value}")
    if row["held_behind"]:
        click.echo(
            f"{'blocking:':<14}{row['held_behind']} later rows of this key wait behind "
            "it (outbox replay / outbox skip)"
        )
    click.echo("headers:")
    for k, v in row["headers"] or []:
        click.echo(f"  {k}: {key_text(v) if v is not None else '(null)'}")
    click.echo("payload:")
    click.echo(render.show_payload(row["payload"]))
