"""The audit trail: `outbox audit` and `outbox audit verify`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from outbox.schema import require_schema

from ..operations import AUDIT_ACTIONS, audit_log, verify_audit
from ..selection import parse_time
from . import render
from .failures import EXIT_CONDITION, EXIT_USAGE, Failure, connect, expected_failures
from .options import dsn_option, json_option, schema_option


@click.group(invoke_without_command=True)
@dsn_option
@schema_option
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option(
    "--action",
    "actions",
    multiple=True,
    type=click.Choice(AUDIT_ACTIONS),
    help="Only entries of this action; repeatable.",
)
@click.option("--actor", default=None, metavar="TEXT", help="Actor contains TEXT (any case).")
@click.option(
    "--since",
    default=None,
    metavar="TIME",
    help="Written at or after TIME: ISO time, or an age like 2h.",
)
@click.option("--until", default=None, metavar="TIME", help="Written before TIME.")
@json_option
@click.pass_context
@expected_failures
def audit(ctx, dsn, schema, limit, actions, actor, since, until, as_json) -> None:
    """The audit trail: every replay, skip, purge and inbox purge, newest first.

    The trail is a hash chain: `outbox audit verify` checks that no entry was edited,
    deleted or reordered, and prints the head hash to record elsewhere.

    \b
    Examples:
      outbox audit
      outbox audit --limit 500 --json > audit.json
      outbox audit --action replay --action skip --actor alice --since 7d
      outbox audit verify
      outbox audit verify --expect-head 3f0c...e1   (a head recorded before)
    """
    if ctx.invoked_subcommand is not None:
        return
    since_at = parse_time(since) if since else None  # usage errors before any connection
    until_at = parse_time(until) if until else None
    with connect(dsn) as conn:
        require_schema(conn, schema)
        entries = audit_log(conn, schema, limit, list(actions), actor, since_at, until_at)
    if as_json:
        click.echo(json.dumps(render.jsonable(entries), indent=2))
        return
    for e in entries:
        ids = e["ids"] or []
        shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
        click.echo(
            f"{e['at']:%Y-%m-%d %H:%M:%S%z}  {e['action']:<6} {e['affected']:>7} rows  "
            f"by {e['actor']} ({e['db_user']})  {json.dumps(e['selection'])}"
            + (f"  reason: {e['reason']}" if e["reason"] else "")
            + (f"  ids: {shown}" if ids else "")
        )


def _group_value(ctx: click.Context, name: str, value: Any) -> Any:
    """A subcommand's --dsn or --schema, or the one given to its group on the command line
    (`outbox audit --dsn ... verify`)."""
    parent = ctx.parent
    if (
        parent is not None
        and ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE
        and parent.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    ):
        return parent.params[name]
    return value


@audit.command(name="verify")
@dsn_option
@schema_option
@click.option(
    "--expect-head",
    default=None,
    metavar="HASH",
    help="A head hash printed before: exit 1 if no entry has it (the tail was cut).",
)
@json_option
@click.pass_context
@expected_failures
def audit_verify(ctx, dsn, schema, expect_head, as_json) -> None:
    """Check the audit trail's hash chain: exit 0 if intact, 1 if tampered with.

    Walks every entry in id order, recomputes its hash and follows its link to the one
    before, and names each entry edited, deleted or reordered. Prints the head hash: record
    it outside the database and pass it back with --expect-head to also catch entries cut
    from the end (docs/operations.md).

    \b
    Examples:
      outbox audit verify
      outbox audit verify --json
      outbox audit verify --expect-head "$(cat /secure/outbox-audit-head)"
    """
    from ..audit import parse_head

    dsn, schema = _group_value(ctx, "dsn", dsn), _group_value(ctx, "schema", schema)
    try:
        expected = parse_head(expect_head) if expect_head is not None else None
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    with connect(dsn) as conn:
        require_schema(conn, schema)
        report = verify_audit(conn, schema, expected)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for finding in report.findings:
            click.echo(finding.message)
        head = (
            f"head {report.head.hex()} (entry {report.head_id})"
            if report.head
            else "no head (the trail is empty)"
        )
        verdict = "valid:" if report.valid else f"NOT valid: {len(report.findings)} findings in"
        click.echo(f"audit trail {verdict} {report.entries} entries checked, {head}")
    if not report.valid:
        sys.exit(EXIT_CONDITION)
