"""`outbox inbox purge`: the consumers' old inbox rows, deleted in audited batches."""

from __future__ import annotations

import datetime as dt

import click

from outbox.schema import require_schema

from ..selection import parse_duration
from .failures import EXIT_USAGE, Failure, confirm, connect, expected_failures
from .options import default_actor, dsn_option, schema_option


@click.group()
def inbox() -> None:
    """The consumers' inbox: the messages each consumer group has processed (docs/consuming.md).

    \b
    Examples:
      outbox inbox purge --older-than 7d --dry-run
      outbox inbox purge --older-than 30d --group ledger --yes
    """


@inbox.command(name="purge")
@dsn_option
@schema_option
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Delete rows processed more than AGE ago (12h, 7d ...). Keep AGE above the "
    "longest time a message can take to come again.",
)
@click.option("--group", default=None, help="Only this consumer group's rows.")
@click.option("--dry-run", is_flag=True, help="Count only.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--actor", default=None, help="Who does it, for the audit trail [user@host].")
@click.option("--reason", default=None, help="Why, for the audit trail.")
@expected_failures
def inbox_purge(dsn, schema, older_than, group, dry_run, yes, actor, reason) -> None:
    """Delete old inbox rows in small batches, each its own short transaction with its audit
    entry (outbox audit --action inbox-purge).

    A message delivered again after its row is gone is processed again, so AGE must exceed
    the longest redelivery (a consumer group's lag, a replay of old messages).

    \b
    Examples:
      outbox inbox purge --older-than 7d --dry-run
      outbox inbox purge --older-than 30d --group ledger --yes --reason "retention"
    """
    from outbox.inbox import count_old

    from ..operations import inbox_purge as purge_audited

    age = parse_duration(older_than)
    if age <= dt.timedelta(0):
        raise Failure("--older-than must be more than 0", EXIT_USAGE)
    whose = f"of group {group!r}" if group else "of every group"
    with connect(dsn) as conn:
        require_schema(conn, schema)
        total = count_old(conn, age, group=group, schema=schema)
        click.echo(f"inbox purge: {total} rows {whose} processed more than {older_than} ago")
        if dry_run or total == 0:
            return
        confirm(f"Delete these {total} rows?", yes)
        deleted = purge_audited(
            conn, schema, age, group, actor or default_actor(), reason, older_than
        )
    click.echo(f"inbox purge: {deleted} rows deleted")
