"""The options several commands share, and the parsing of their values."""

from __future__ import annotations

import getpass
import socket

import click

from outbox.errors import OutboxError
from outbox.sql import validate_identifier

from ..shards import validate_shards
from .failures import EXIT_USAGE, Failure

#: The DSN of commands that only talk to Kafka, for RelayConfig's other checks: well formed,
#: never connected to.
NO_DATABASE = "dbname=unused"

dsn_option = click.option(
    "--dsn",
    envvar="OUTBOX_DSN",
    default="",
    show_envvar=True,
    help="PostgreSQL connection string (its password is never printed).",
)


def _valid_schema(_ctx, _param, value: str) -> str:
    try:
        return validate_identifier(value)
    except OutboxError as exc:
        raise click.BadParameter(str(exc)) from None


def valid_shards(_ctx, _param, value: int | None) -> int | None:
    """A --shards callback: a usage error for a count the relay cannot split its buckets by."""
    if value is None:
        return None
    try:
        return validate_shards(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


schema_option = click.option(
    "--schema",
    envvar="OUTBOX_SCHEMA",
    default="public",
    show_default=True,
    show_envvar=True,
    callback=_valid_schema,
    help="Schema that holds local_message.",
)
bootstrap_option = click.option(
    "--bootstrap-servers",
    "-b",
    envvar="OUTBOX_BOOTSTRAP_SERVERS",
    default="",
    show_envvar=True,
    help="Kafka bootstrap servers.",
)
kafka_option = click.option(
    "-X",
    "kafka_settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="librdkafka setting, repeatable (security.protocol, sasl.*, ssl.* ...).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def selection_options(func):
    """The selection shared by list, replay and skip."""
    options = [
        click.argument("refs", nargs=-1, metavar="[ID|MESSAGE_ID]..."),
        click.option(
            "--status",
            "statuses",
            multiple=True,
            metavar="STATUS",
            help="PENDING, SENT, CONFIRMED, FAILED or SKIPPED; repeatable.",
        ),
        click.option("--topic", default=None, help="Only this topic."),
        click.option("--key", default=None, help="Only this key (text)."),
        click.option("--key-hex", default=None, help="Only this key (hex, for binary keys)."),
        click.option(
            "--tenant",
            default=None,
            metavar="NAME",
            help="Only this tenant's rows ('' or - for the rows without a tenant).",
        ),
        click.option(
            "--since",
            default=None,
            metavar="TIME",
            help="Created at or after TIME: ISO time, or an age like 2h.",
        ),
        click.option("--until", default=None, metavar="TIME", help="Created before TIME."),
        click.option(
            "--error", default=None, metavar="TEXT", help="last_error contains TEXT (any case)."
        ),
        click.option(
            "--expired-claims",
            is_flag=True,
            help="SENT rows whose claim (claim_expires_at) has expired.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def parse_kafka_settings(items) -> dict[str, str]:
    """The -X KEY=VALUE items as librdkafka settings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Failure(f"-X needs KEY=VALUE, got {item.split('=')[0]!r}", EXIT_USAGE)
        out[key.strip()] = value
    return out


def default_actor() -> str:
    """Who changes rows when --actor is not given, for the audit trail: user@host."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
