"""`outbox reconcile`: CONFIRMED rows against the records at their Kafka offsets."""

from __future__ import annotations

import json
import sys

import click
import psycopg

from outbox.errors import OutboxError
from outbox.schema import require_schema

from ..config import RelayConfig, first_line, redact_text, secrets_of
from ..selection import Selection
from .failures import EXIT_USAGE, Failure, connect, expected_failures, kafka_failures
from .options import (
    bootstrap_option,
    dsn_option,
    json_option,
    kafka_option,
    parse_kafka_settings,
    schema_option,
)


@click.command()
@dsn_option
@schema_option
@bootstrap_option
@kafka_option
@click.option(
    "--since",
    default="24h",
    show_default=True,
    metavar="TIME",
    help="Rows delivered since TIME: an age (30m, 24h, 7d) or an ISO time.",
)
@click.option("--until", default=None, metavar="TIME", help="Rows delivered before TIME [now].")
@click.option("--topic", default=None, help="Only this topic.")
@click.option("--key", default=None, help="Only this key (text).")
@click.option("--key-hex", default=None, help="Only this key (hex, for binary keys).")
@click.option("--sample", type=int, default=None, metavar="N", help="A random N rows of them.")
@click.option("--limit", type=int, default=None, metavar="N", help="The N delivered last.")
@click.option(
    "--timeout",
    type=float,
    default=15.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest wait for a broker or a partition; its rows are then unreadable.",
)
@click.option(
    "--show", type=int, default=20, show_default=True, metavar="N", help="Problem rows listed."
)
@json_option
@expected_failures
def reconcile(
    dsn,
    schema,
    bootstrap_servers,
    kafka_settings,
    since,
    until,
    topic,
    key,
    key_hex,
    sample,
    limit,
    timeout,
    show,
    as_json,
) -> None:
    """Check that Kafka holds each CONFIRMED row's message at its recorded offset.

    For every CONFIRMED row delivered in the window, read the record at its topic, partition
    and offset (read_committed) and compare its message_id header, key and payload (SHA-256).
    Each row is ok, or one of: mismatched (another message_id, key or payload: the fields are
    named), missing (no such topic or partition, beyond the partition's end, or no committed
    record there on a topic that is not compacted), expired (deleted by retention: below the
    partition's first offset), unreadable (no recorded offset, no committed record there on a
    compacted topic or one whose cleanup.policy cannot be read, or the broker did not answer
    within --timeout).
    Reads each partition forward; --json lists every problem row.

    \b
    Exit codes:
      0  every row checked is ok (or the window is empty)
      1  a row is missing or mismatched
      2  usage or configuration error
      3  could not check: some rows expired or unreadable and none missing or mismatched,
         or the database or Kafka could not be reached

    \b
    Examples:
      outbox reconcile -b kafka:9092                         # the last 24 hours
      outbox reconcile -b kafka:9092 --since 2h --topic payments
      outbox reconcile -b kafka:9092 --since 7d --sample 10000 --json
    """
    from contextlib import nullcontext

    from ..kafka import KafkaRecordSource
    from ..prefetch import Prefetch
    from ..reconcile import EXIT_UNCHECKED, Reconciler
    from ..reconcile_rows import AHEAD, RowPages, Window

    for name, value in (("--sample", sample), ("--limit", limit)):
        if value is not None and value < 1:
            raise Failure(f"{name} must be at least 1", EXIT_USAGE)
    if sample is not None and limit is not None:
        raise Failure("give --sample or --limit, not both", EXIT_USAGE)
    if not 0.1 <= timeout <= 3600:
        raise Failure("--timeout must be between 0.1 and 3600 seconds", EXIT_USAGE)
    keyed = Selection.from_cli(topic=topic, key=key, key_hex=key_hex, since=since, until=until)
    window = Window(keyed.since, keyed.until, keyed.topic, keyed.key, sample, limit)
    cfg = RelayConfig.from_env(
        dsn=dsn or None,
        schema=schema,
        bootstrap_servers=bootstrap_servers or None,
        kafka=parse_kafka_settings(kafka_settings),
    )
    secrets = secrets_of(cfg)
    with kafka_failures(cfg, unreachable=EXIT_UNCHECKED):
        source = KafkaRecordSource(cfg.producer_config(), timeout=timeout)
    try:
        problem = source.check(min(timeout, 10.0))
        if problem:
            raise Failure(
                redact_text(f"cannot reach Kafka at {cfg.bootstrap_servers}: {problem}", *secrets),
                EXIT_UNCHECKED,
            )
        try:
            conn = connect(dsn)  # a malformed DSN was refused above, by RelayConfig
        except Failure as exc:  # not checked: exit 3, not 1 (which says rows are missing)
            raise Failure(str(exc), EXIT_UNCHECKED) from None
        try:
            with conn:
                require_schema(conn, schema)
                pages = RowPages(conn, schema, window)
                # Over the id range (or the picked ids): no count of the window beforehand.
                bar = (
                    click.progressbar(length=pages.total, label="reconcile", file=sys.stderr)
                    if sys.stderr.isatty()
                    else None
                )
                shown = 0

                def advance(_rows: int) -> None:
                    nonlocal shown
                    if bar is not None:
                        bar.update(pages.position - shown)
                        shown = pages.position

                # The next page is read on its own thread (which owns conn until it is
                # joined, at the end of the block) while the rows before it are checked.
                with (
                    Prefetch(
                        pages.pages, depth=AHEAD, cancel=pages.cancel, name="reconcile-rows"
                    ) as ahead,
                    bar or nullcontext(),
                ):
                    checker = Reconciler(source, progress=advance if bar else None)
                    report = checker.check(pages.rows(ahead))
        except (OutboxError, psycopg.Error) as exc:
            raise Failure(first_line(exc), EXIT_UNCHECKED) from None
    finally:
        source.close()
    if as_json:
        out = {"window": window.describe(), **report.as_dict()}
        click.echo(redact_text(json.dumps(out, indent=2), *secrets))
        sys.exit(report.exit_code())
    counts = report.counts
    described = ", ".join(f"{k} {v}" for k, v in window.describe().items())
    click.echo(
        f"reconcile: {report.checked} CONFIRMED rows ({described}): "
        + ", ".join(f"{counts[c]} {c}" for c in counts)
    )
    listed = report.problems[: max(0, show)]
    if listed:
        click.echo(
            f"{'ID':>10}  {'MESSAGE_ID':<36}  {'TOPIC':<24} {'PART':>4} {'OFFSET':>10}  PROBLEM"
        )
    for p in listed:
        r = p.row
        click.echo(
            redact_text(
                f"{r.id:>10}  {r.message_id:<36}  {r.topic[:24]:<24} "
                f"{'-' if r.partition is None else r.partition:>4} "
                f"{'-' if r.offset is None else r.offset:>10}  {p.problem}"
                + (f" ({', '.join(p.fields)})" if p.fields else "")
                + f": {p.detail}",
                *secrets,
            )
        )
    more = report.checked - counts["ok"] - len(listed)
    if more > 0:
        click.echo(f"... and {more} more problem rows (--json lists them all)")
    sys.exit(report.exit_code())
