"""Changing rows, audited: `outbox replay`, `outbox skip`, `outbox purge`."""

from __future__ import annotations

import datetime as dt
import sys

import click

from outbox.schema import require_schema

from ..selection import Selection, key_text, parse_duration, parse_tenant
from . import render
from .failures import Failure, confirm, connect, expected_failures
from .options import default_actor, dsn_option, schema_option, selection_options


def _change_command(action: str):
    """replay and skip: the same selection, dry run, confirmation, batches, audit."""

    def run(
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
        dry_run,
        yes,
        actor,
        reason,
    ):
        from .. import operations

        selection = Selection.from_cli(
            refs, statuses, topic, key, key_hex, since, until, error, expired_claims, tenant
        )
        operations.check_change(action, selection)
        with connect(dsn) as conn:
            require_schema(conn, schema)
            counts = operations.count_rows(conn, schema, selection)
            total = operations.count_changeable(conn, schema, selection, action)
            if not counts:
                raise Failure(f"{action}: no message matches {render.described(selection)}")
            sample = operations.list_rows(conn, schema, selection, limit=5)
            matched = sum(counts.values())
            click.echo(
                f"{action}: {total} messages match "
                f"({', '.join(f'{st} {n}' for st, n in counts.items())})"
                if total == matched
                else f"{action}: {total} of {matched} matching messages can be changed "
                f"({', '.join(f'{st} {n}' for st, n in counts.items())}): "
                + (
                    "skip takes FAILED rows, and SCHEDULED ones with --status SCHEDULED"
                    if action == "skip"
                    else "PENDING rows never tried are on their way already, SCHEDULED rows "
                    "at their time, SENT rows wait for their claim to expire"
                )
            )
            for r in sample:
                click.echo(
                    f"  {r['id']:>10} {r['status']:<9} {r['topic']} "
                    f"{key_text(r['key'])} {(r['last_error'] or '')[:60]}"
                )
            if total == 0:
                raise Failure(f"{action}: none of the {matched} matching messages can be changed")
            if dry_run:
                return
            confirm(f"{action.capitalize()} these {total} messages?", yes)
            with click.progressbar(length=total, label=action, file=sys.stderr) as bar:
                do = operations.replay if action == "replay" else operations.skip
                changed = do(
                    conn, schema, selection, actor or default_actor(), reason, progress=bar.update
                )
        click.echo(
            f"{action}: {len(changed)} messages "
            f"{'back to PENDING' if action == 'replay' else 'SKIPPED'} "
            "(recorded in the audit trail: outbox audit)"
        )
        if not changed:  # they changed between the count and the change (a relay, an operator)
            raise Failure(f"{action}: no message changed")

    return run


def _change_options(func):
    for option in reversed(
        [
            dsn_option,
            schema_option,
            selection_options,
            click.option(
                "--dry-run", is_flag=True, help="Show the count and a sample; change nothing."
            ),
            click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation."),
            click.option(
                "--actor", default=None, help="Who does it, for the audit trail [user@host]."
            ),
            click.option("--reason", default=None, help="Why, for the audit trail."),
            expected_failures,
        ]
    ):
        func = option(func)
    return func


@click.command()
@_change_options
def replay(**kwargs) -> None:
    """Send selected messages again: back to PENDING, attempts and backoff cleared.

    Takes FAILED and SKIPPED rows, PENDING rows waiting for a retry (sent at once), SENT rows
    whose claim expired, and CONFIRMED rows (sent once more: consumers see a duplicate, which
    they drop by message_id). Works in batches of 1,000, each with its audit row.

    \b
    Examples:
      outbox replay 1234 --yes
      outbox replay --status FAILED --topic payments --dry-run
      outbox replay --status FAILED --error UNKNOWN_TOPIC --reason "topic created" --yes
      outbox replay --status CONFIRMED --topic ledger --since 2026-11-26T09:00 --until 1h
    """
    _change_command("replay")(**kwargs)


@click.command()
@_change_options
def skip(**kwargs) -> None:
    """Mark selected FAILED messages SKIPPED, on purpose, to unblock their keys.

    A skipped message is never sent (unless replayed); the later messages of its key go on.

    \b
    Examples:
      outbox skip 1234 --reason "malformed, re-issued as 1301" --yes
      outbox skip --status FAILED --key account-42 --dry-run
    """
    _change_command("skip")(**kwargs)


@click.command()
@dsn_option
@schema_option
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Delete rows created more than AGE ago (30m, 12h, 7d ...).",
)
@click.option("--include-skipped", is_flag=True, help="Delete SKIPPED rows too.")
@click.option(
    "--tenant",
    default=None,
    metavar="NAME",
    help="Only this tenant's rows ('' or - for the rows without a tenant).",
)
@click.option("--dry-run", is_flag=True, help="Count only.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--actor", default=None, help="Who does it, for the audit trail [user@host].")
@click.option("--reason", default=None, help="Why, for the audit trail.")
@expected_failures
def purge(dsn, schema, older_than, include_skipped, tenant, dry_run, yes, actor, reason) -> None:
    """Delete old CONFIRMED (and, if asked, SKIPPED) rows in small batches.

    Never PENDING, SENT or FAILED rows. Each batch of 1,000 is its own short transaction,
    with its audit entry.

    \b
    Examples:
      outbox purge --older-than 7d --dry-run
      outbox purge --older-than 30d --include-skipped --yes --reason "retention: 30 days"
      outbox purge --older-than 90d --tenant acme --yes
    """
    from .. import operations

    cutoff = dt.datetime.now(dt.timezone.utc) - parse_duration(older_than)
    statuses = operations.purge_statuses(include_skipped)
    tenant = parse_tenant(tenant)
    with connect(dsn) as conn:
        require_schema(conn, schema)
        total = operations.purge_count(conn, schema, statuses, cutoff, tenant)
        whose = "" if tenant is None else f" of tenant {tenant!r}"
        click.echo(
            f"purge: {total} {' and '.join(statuses)} rows{whose} created before "
            f"{cutoff.isoformat(timespec='seconds')}"
        )
        if dry_run or total == 0:
            return
        confirm(f"Delete these {total} rows?", yes)
        with click.progressbar(length=total, label="purge", file=sys.stderr) as bar:
            deleted = operations.purge(
                conn,
                schema,
                statuses,
                cutoff,
                actor or default_actor(),
                reason,
                progress=bar.update,
                tenant=tenant,
            )
    click.echo(f"purge: {deleted} rows deleted")
