"""`outbox topics check` and `outbox topics create`."""

from __future__ import annotations

import json

import click

from ..config import RelayConfig, redact_text, secrets_of
from .failures import EXIT_USAGE, Failure, connect, expected_failures, kafka_failures
from .options import (
    NO_DATABASE,
    bootstrap_option,
    dsn_option,
    json_option,
    kafka_option,
    parse_kafka_settings,
    schema_option,
)


@click.group()
def topics() -> None:
    """The Kafka topics the outbox delivers to: check that they exist, or create them.

    The topics are those named by every row still to be delivered (PENDING, FAILED, SENT),
    plus each --topic NAME (a topic no row names yet). The relay does not create topics, and
    with auto-creation off a missing topic fails its rows: create them before the relay runs.

    \b
    Examples:
      outbox topics check -b kafka:9092
      outbox topics create -b kafka:9092 --topic payments --partitions 6 --replication-factor 3
    """


def _topics_options(func):
    for option in reversed(
        [
            dsn_option,
            schema_option,
            bootstrap_option,
            kafka_option,
            click.option(
                "--topic",
                "named",
                multiple=True,
                metavar="NAME",
                help="This topic too, repeatable (before any row names it, say).",
            ),
            click.option(
                "--no-table",
                is_flag=True,
                help="Do not read the table (no database needed): only the --topic names.",
            ),
        ]
    ):
        func = option(func)
    return func


def _topics_wanted(dsn, schema, bootstrap_servers, kafka_settings, named, no_table):
    """The Kafka settings and the topics wanted (name -> rows to deliver); bad names and
    settings are refused before any connection."""
    from outbox.errors import InvalidTopic

    from .. import topics as t

    try:
        names = t.valid_names(named)
    except InvalidTopic as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    if no_table and not names:
        raise Failure("--no-table needs at least one --topic NAME", EXIT_USAGE)
    if not no_table and not dsn:
        raise Failure(
            "no database: set --dsn or OUTBOX_DSN (or give --no-table with --topic NAME)",
            EXIT_USAGE,
        )
    cfg = RelayConfig.from_env(
        dsn=dsn or NO_DATABASE,  # --no-table
        schema=schema,
        bootstrap_servers=bootstrap_servers or None,
        kafka=parse_kafka_settings(kafka_settings),
    )
    table: dict[str, int] = {}
    if not no_table:
        with connect(dsn) as conn:
            table = t.undelivered_topics(conn, schema)
    return cfg, t.wanted_topics(table, names)


def _topic_line(r) -> str:
    from ..topics import NO_LEADER

    shape = ""
    if r.state in ("present", "created", "would create", NO_LEADER):
        shape = (
            f", {r.partitions} partitions" if r.partitions else ", the cluster's default partitions"
        ) + (
            f", replication factor {r.replication_factor}"
            if r.replication_factor
            else ", its default replication factor"
        )
    rows = f" ({r.rows} rows to deliver)" if r.rows else ""
    note = f": {r.note}" if r.note else ""
    return f"{r.name}: {r.state}{shape}{rows}{note}"


@topics.command(name="check")
@_topics_options
@json_option
@expected_failures
def topics_check(dsn, schema, bootstrap_servers, kafka_settings, named, no_table, as_json):
    """Say which topics exist (with their partitions) and which are missing; exit 1 if any is.

    \b
    Examples:
      outbox topics check -b kafka:9092
      outbox topics check -b kafka:9092 --topic payments --json
    """
    from ..topics import check

    cfg, wanted = _topics_wanted(dsn, schema, bootstrap_servers, kafka_settings, named, no_table)
    with kafka_failures(cfg):
        reports = check(cfg.producer_config(), wanted) if wanted else []
    missing = [r.name for r in reports if r.state == "missing"]
    if as_json:
        click.echo(json.dumps({"topics": [r.as_dict() for r in reports], "missing": missing}))
    else:
        if not reports:
            click.echo("no topics: no row to deliver names one, and no --topic was given")
        for r in reports:
            click.echo(_topic_line(r))
    if missing:
        raise Failure(
            f"{len(missing)} of {len(reports)} topics missing: {', '.join(missing)} "
            "(create them: outbox topics create)"
        )


@topics.command(name="create")
@_topics_options
@click.option(
    "--partitions",
    type=int,
    default=None,
    help="Partitions of each new topic [the cluster's num.partitions]. A key's messages stay "
    "in order within one partition; choose enough for the consumers you will run.",
)
@click.option(
    "--replication-factor",
    type=int,
    default=None,
    help="Replicas of each partition [the cluster's default.replication.factor]; 3 on a "
    "production cluster.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Have the broker validate the creation, and create nothing.",
)
@expected_failures
def topics_create(
    dsn,
    schema,
    bootstrap_servers,
    kafka_settings,
    named,
    no_table,
    partitions,
    replication_factor,
    dry_run,
):
    """Create the missing topics; report the ones there are (idempotent). Exit 1 if a topic
    could not be created, or has a partition without a leader once the wait ends.

    A topic that exists is reported and left as it is, even with fewer partitions than
    asked: more partitions would move keys to other partitions, and their messages could be
    read out of order.

    \b
    Examples:
      outbox topics create -b kafka:9092 --dry-run
      outbox topics create -b kafka:9092 --partitions 6 --replication-factor 3
      outbox topics create -b kafka:9092 --topic payments --topic ledger --no-table
    """
    from ..topics import NO_LEADER, create

    for name, value in (("--partitions", partitions), ("--replication-factor", replication_factor)):
        if value is not None and value < 1:
            raise Failure(f"{name} must be at least 1, not {value}", EXIT_USAGE)
    cfg, wanted = _topics_wanted(dsn, schema, bootstrap_servers, kafka_settings, named, no_table)
    if not wanted:
        click.echo("no topics: no row to deliver names one, and no --topic was given")
        return
    with kafka_failures(cfg):
        reports = create(
            cfg.producer_config(), wanted, partitions, replication_factor, dry_run=dry_run
        )
    for r in reports:
        click.echo(redact_text(_topic_line(r), *secrets_of(cfg)))
    failed = [r for r in reports if r.state == "not created"]
    if dry_run:
        click.echo("dry run: nothing created")
    # A topic without a leader fails its rows' delivery: a script must not start a relay yet.
    leaderless = [r.name for r in reports if r.state == NO_LEADER]
    if failed or leaderless:
        by_reason: dict[str, list[str]] = {}
        for r in failed:
            by_reason.setdefault(r.note, []).append(r.name)
        parts = []
        if failed:
            parts.append(
                f"{len(failed)} of {len(reports)} topics not created: "
                + "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())
            )
        if leaderless:
            parts.append(
                f"{len(leaderless)} of {len(reports)} topics created without a leader for "
                f"every partition yet: {', '.join(leaderless)} (a relay would fail their rows; "
                "see that the brokers are up, then run outbox topics create again)"
            )
        raise Failure(redact_text("; ".join(parts), *secrets_of(cfg)))
