"""Setting up: `outbox migrate`, `outbox grants`, `outbox doctor`."""

from __future__ import annotations

import json
import os
import sys

import click

from outbox.message import DEFAULT_MAX_MESSAGE_BYTES
from outbox.schema import apply_schema, installed_version
from outbox.sql import schema_sql

from ..config import DELIVERY_MODES, RelayConfig, check_dsn, redact_text, secrets_of
from ..operations import GRANT_ROLES, grant_statements
from .failures import EXIT_CONDITION, Failure, connect, expected_failures
from .options import (
    NO_DATABASE,
    bootstrap_option,
    dsn_option,
    json_option,
    kafka_option,
    parse_kafka_settings,
    schema_option,
    valid_shards,
)


@click.command()
@dsn_option
@schema_option
@click.option(
    "--print",
    "print_sql",
    is_flag=True,
    help="Write the schema's SQL to stdout instead of applying it.",
)
@click.option(
    "--kafka",
    "kafka_topics",
    is_flag=True,
    help="Instead: create (or check) exactly-once delivery's progress topic in Kafka.",
)
@bootstrap_option
@kafka_option
@click.option(
    "--shards",
    type=int,
    default=None,
    callback=valid_shards,
    help="With --kafka: the relay's shards [4].",
)
@click.option("--progress-topic", default=None, help="With --kafka: its name [outbox-progress].")
@expected_failures
def migrate(
    dsn: str,
    schema: str,
    print_sql: bool,
    kafka_topics: bool,
    bootstrap_servers: str,
    kafka_settings,
    shards,
    progress_topic,
) -> None:
    """Create or upgrade the outbox tables and print the schema version.

    With --kafka, create the compacted progress topic that exactly-once delivery records its
    progress in (one partition per shard), or check the one there is.

    \b
    Examples:
      outbox migrate --dsn postgresql://app@db/app
      outbox migrate --schema payments
      outbox migrate --print > V42__outbox.sql
      outbox migrate --kafka -b kafka:9092 --shards 16
    """
    if print_sql:
        click.echo(schema_sql(), nl=False)
        return
    if kafka_topics:
        _migrate_kafka(bootstrap_servers, kafka_settings, shards, progress_topic)
        return
    with connect(dsn) as conn:
        before = installed_version(conn, schema)
        version = apply_schema(conn, schema)
    if before == version:
        click.echo(f"outbox schema {schema}: version {version} (already up to date)")
    else:
        click.echo(f"outbox schema {schema}: version {version} (was {before or 'absent'})")


def _migrate_kafka(bootstrap_servers, kafka_settings, shards, progress_topic) -> None:
    from ..kafka import check_progress_topic

    cfg = RelayConfig.from_env(
        dsn=NO_DATABASE,
        bootstrap_servers=bootstrap_servers or None,
        shards=shards,
        progress_topic=progress_topic,
        delivery="exactly-once",
        kafka=parse_kafka_settings(kafka_settings),
    )
    problem = check_progress_topic(
        cfg.producer_config(), cfg.progress_topic, cfg.shards, create=True
    )
    if problem:
        raise Failure(redact_text(problem, *secrets_of(cfg)))
    click.echo(f"progress topic {cfg.progress_topic}: {cfg.shards} partitions, compacted (ready)")


@click.command()
@dsn_option
@schema_option
@bootstrap_option
@kafka_option
@json_option
@click.option(
    "--delivery",
    type=click.Choice(DELIVERY_MODES),
    envvar="OUTBOX_DELIVERY",
    default="at-least-once",
    show_envvar=True,
    help="exactly-once: check the progress topic too.",
)
@click.option(
    "--shards",
    type=int,
    envvar="OUTBOX_SHARDS",
    default=4,
    show_default=True,
    callback=valid_shards,
)
@click.option(
    "--progress-topic", envvar="OUTBOX_PROGRESS_TOPIC", default="outbox-progress", show_default=True
)
@expected_failures
def doctor(
    dsn, schema, bootstrap_servers, kafka_settings, as_json, delivery, shards, progress_topic
) -> None:
    """Check the set-up and say what to do about each problem.

    Checks PostgreSQL and Kafka connectivity, the schema version, the expected indexes, that
    the topics of pending messages exist, the table's autovacuum settings, transactions old
    enough to hold back vacuum, dead rows, FAILED rows and live relays; with --delivery
    exactly-once, the progress topic. Exit 1 if any check fails (warnings alone exit 0).

    \b
    Examples:
      outbox doctor -b kafka:9092
      outbox doctor -b kafka:9092 --delivery exactly-once
      outbox doctor --json
    """
    from ..doctor import run_checks

    check_dsn(dsn)  # no DSN at all: say so, rather than try the local socket
    kafka = parse_kafka_settings(kafka_settings)
    if bootstrap_servers:
        kafka["bootstrap.servers"] = bootstrap_servers
    limit = os.environ.get("OUTBOX_MAX_MESSAGE_BYTES", "")
    findings = run_checks(
        dsn,
        schema,
        kafka,
        int(limit) if limit.isdigit() else DEFAULT_MAX_MESSAGE_BYTES,
        (progress_topic, shards) if delivery == "exactly-once" else None,
    )
    secrets = secrets_of(RelayConfig(dsn=dsn, kafka=kafka))
    if as_json:
        click.echo(redact_text(json.dumps([f.as_dict() for f in findings], indent=2), *secrets))
    else:
        for f in findings:
            click.echo(redact_text(f.line(), *secrets))
    if any(f.level == "fail" for f in findings):
        sys.exit(EXIT_CONDITION)


@click.command()
@schema_option
@click.option("--role", required=True, help="The database role to grant to.")
@click.option(
    "--for",
    "kind",
    type=click.Choice(GRANT_ROLES),
    default="relay",
    show_default=True,
    help="What the role does.",
)
@click.option("--retention", is_flag=True, help="The relay runs with --retention (DELETE).")
@expected_failures
def grants(schema, role, kind, retention) -> None:
    """Print the least GRANTs a role needs, for a DBA to review and run.

    \b
    Examples:
      outbox grants --role outbox_relay | psql "$ADMIN_DSN"
      outbox grants --role payments_app --for writer
      outbox grants --role oncall --for operator --schema billing
      outbox grants --role ledger_consumer --for consumer
    """
    for text in grant_statements(schema, role, kind, retention):
        click.echo(text)
