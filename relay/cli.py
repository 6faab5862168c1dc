"""The `outbox` command: what operators run.

Exit codes: 0 ok, 1 a check or condition failed (or an expected failure such as an unreachable
database), 2 usage or configuration error. Expected failures print one line, never a traceback,
and never a password.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import functools
import getpass
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import click
import psycopg

from outbox.errors import OutboxError
from outbox.message import DEFAULT_MAX_MESSAGE_BYTES
from outbox.schema import apply_schema, installed_version, require_schema
from outbox.sql import schema_sql, validate_identifier

from .config import (
    DELIVERY_MODES,
    ConfigError,
    RelayConfig,
    check_dsn,
    first_line,
    redact_dsn,
    redact_text,
    secrets_of,
)
from .selection import Selection, SelectionError, key_text, parse_duration, parse_ref
from .shards import validate_shards

EXIT_OK, EXIT_CONDITION, EXIT_USAGE = 0, 1, 2


class Failure(Exception):
    """An expected failure: one line for the operator, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_CONDITION):
        super().__init__(message)
        self.code = code


#: The DSN of commands that only talk to Kafka, for RelayConfig's other checks: well formed,
#: never connected to.
NO_DATABASE = "dbname=unused"


def expected_failures(func):
    """Turn the failures an operator can meet into one clean line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        dsn = kwargs.get("dsn") or ""
        secrets = secrets_of(RelayConfig(dsn=dsn)) if dsn else []
        try:
            return func(*args, **kwargs)
        except Failure as exc:
            message, code = str(exc), exc.code
        except SelectionError as exc:
            message, code = str(exc), EXIT_USAGE
        except ConfigError as exc:
            message, code = f"invalid configuration: {exc}", EXIT_USAGE
        except (OutboxError, psycopg.Error) as exc:
            message, code = first_line(exc), EXIT_CONDITION
        click.echo(f"error: {redact_text(message, *secrets)}", err=True)
        sys.exit(code)

    return wrapper


@contextlib.contextmanager
def _kafka_failures(cfg: RelayConfig, unreachable: int = EXIT_CONDITION) -> Iterator[None]:
    """A Kafka setting librdkafka refuses: a usage error (exit 2); a cluster that cannot be
    reached or refuses: one line, exit UNREACHABLE. Either way with the -X secrets masked
    (expected_failures knows only the DSN's)."""
    try:
        yield
    except ConfigError as exc:
        message, code = f"invalid configuration: {first_line(exc)}", EXIT_USAGE
    except OutboxError as exc:
        message, code = first_line(exc), unreachable
    else:
        return
    raise Failure(redact_text(message, *secrets_of(cfg)), code) from None


def _connect(dsn: str) -> psycopg.Connection:
    try:
        check_dsn(dsn)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    try:
        return psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name="outbox-cli"
        )
    except psycopg.Error as exc:
        raise Failure(f"cannot connect to {redact_dsn(dsn)}: {first_line(exc)}") from None


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _show_payload(payload: bytes) -> str:
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        shown = payload[:512].hex(" ")
        return f"({len(payload)} bytes, not UTF-8) {shown}{' ...' if len(payload) > 512 else ''}"


def _payload_for_json(payload: bytes) -> tuple[Any, str]:
    """The payload as a JSON value when it is JSON that Python reads back exactly, else as
    text, else base64; and which. Exactly: an amount like 12345678901234567.89 would come out
    as 1.2345678901234568e+16 through a float, and of a duplicated key one value would be
    lost; such a payload is shown as its text."""
    try:
        return json.loads(
            payload,
            parse_float=_exact_float,
            parse_constant=_not_json,
            object_pairs_hook=_without_duplicates,
        ), "json"
    except (ValueError, ArithmeticError):
        pass
    try:
        return payload.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), "base64"


def _exact_float(text: str) -> float:
    value = float(text)
    if decimal.Decimal(repr(value)) != decimal.Decimal(text):
        raise ArithmeticError(f"{text} is not exact as a float")
    return value


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")  # NaN, Infinity: Python's extension, not JSON


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def _age(when: dt.datetime | None) -> str:
    if when is None:
        return "-"
    seconds = (dt.datetime.now(dt.timezone.utc) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _waits(row: dict[str, Any]) -> str:
    """Why a PENDING row is not sent yet: held behind a row of its key, or its next try."""
    if row["status"] != "PENDING":
        return ""
    if row["held_by"] is not None:
        return f"held by {row['held_by']}"
    if row["next_attempt_at"] is not None:
        wait = (row["next_attempt_at"] - dt.datetime.now(dt.timezone.utc)).total_seconds()
        return f"retry in {max(wait, 0):.0f}s"
    return ""


def _described(selection) -> str:
    return " ".join(f"{k}={v}" for k, v in selection.describe().items())


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return key_text(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return str(value)


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Failure("not a terminal: add --yes to confirm", EXIT_USAGE)
    if not click.confirm(question, default=False, err=True):
        raise Failure("nothing done", EXIT_CONDITION)


# --------------------------------------------------------------------------- options

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


def _valid_shards(_ctx, _param, value: int | None) -> int | None:
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


def _selection(refs, statuses, topic, key, key_hex, since, until, error, expired_claims):
    return Selection.from_cli(
        refs, statuses, topic, key, key_hex, since, until, error, expired_claims
    )


def _kafka_settings(items) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Failure(f"-X needs KEY=VALUE, got {item.split('=')[0]!r}", EXIT_USAGE)
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="outbox-relay", message="outbox-relay %(version)s")
def main() -> None:
    """Transactional outbox for PostgreSQL, delivered to Kafka.

    \b
    Every command reads OUTBOX_DSN and OUTBOX_SCHEMA (or --dsn, --schema).
    Exit codes: 0 ok, 1 a check or condition failed, 2 usage or configuration error.

    \b
    Examples:
      outbox migrate                       create or upgrade the tables
      outbox relay -b kafka:9092           deliver pending events to Kafka
      outbox status                        counts, lag, blocked keys, relays
      outbox list --status FAILED          what is stuck, and why
      outbox show 1234                     one message, whole
      outbox replay 1234 --yes             send it again
      outbox doctor -b kafka:9092          check the set-up, with advice
      outbox inbox purge --older-than 7d   delete consumers' old inbox rows
    """


@main.command()
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
    callback=_valid_shards,
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
    with _connect(dsn) as conn:
        before = installed_version(conn, schema)
        version = apply_schema(conn, schema)
    if before == version:
        click.echo(f"outbox schema {schema}: version {version} (already up to date)")
    else:
        click.echo(f"outbox schema {schema}: version {version} (was {before or 'absent'})")


def _migrate_kafka(bootstrap_servers, kafka_settings, shards, progress_topic) -> None:
    from .kafka import check_progress_topic

    cfg = RelayConfig.from_env(
        dsn=NO_DATABASE,
        bootstrap_servers=bootstrap_servers or None,
        shards=shards,
        progress_topic=progress_topic,
        delivery="exactly-once",
        kafka=_kafka_settings(kafka_settings),
    )
    problem = check_progress_topic(
        cfg.producer_config(), cfg.progress_topic, cfg.shards, create=True
    )
    if problem:
        raise Failure(redact_text(problem, *secrets_of(cfg)))
    click.echo(f"progress topic {cfg.progress_topic}: {cfg.shards} partitions, compacted (ready)")


# --------------------------------------------------------------------------- outbox topics


@main.group()
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

    from . import topics as t

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
        kafka=_kafka_settings(kafka_settings),
    )
    table: dict[str, int] = {}
    if not no_table:
        with _connect(dsn) as conn:
            table = t.undelivered_topics(conn, schema)
    return cfg, t.wanted_topics(table, names)


def _topic_line(r) -> str:
    from .topics import NO_LEADER

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
    from .topics import check

    cfg, wanted = _topics_wanted(dsn, schema, bootstrap_servers, kafka_settings, named, no_table)
    with _kafka_failures(cfg):
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
    from .topics import NO_LEADER, create

    for name, value in (("--partitions", partitions), ("--replication-factor", replication_factor)):
        if value is not None and value < 1:
            raise Failure(f"{name} must be at least 1, not {value}", EXIT_USAGE)
    cfg, wanted = _topics_wanted(dsn, schema, bootstrap_servers, kafka_settings, named, no_table)
    if not wanted:
        click.echo("no topics: no row to deliver names one, and no --topic was given")
        return
    with _kafka_failures(cfg):
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


@main.command()
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
    from .status import health_problems, read_status

    with _connect(dsn) as conn:
        report = read_status(conn, schema, rate_window)
    problems = report["problems"] = health_problems(report, fail_if_lag, fail_if_failed)
    if as_json:
        click.echo(json.dumps(_jsonable(report), indent=None if watching else 2))
    else:
        _print_status(report)
    if problems and not watching:
        sys.exit(EXIT_CONDITION)
    return problems


def _print_status(report: dict[str, Any]) -> None:
    click.echo(f"schema {report['schema']}: version {report['schema_version']}")
    click.echo("  " + "  ".join(f"{st} {n}" for st, n in report["counts"].items()))
    click.echo(
        f"lag (oldest PENDING row the relay may send now): "
        f"{_seconds(report['oldest_pending_age_seconds'])}"
        f"   waiting for a retry: {report['in_backoff']}"
        f"   held behind a blocked key: {report['held']}"
    )
    for topic, t in report["topics"].items():
        click.echo(
            f"  topic {topic}: "
            + ", ".join(f"{k} {v}" for k, v in t["counts"].items())
            + f"; lag {_seconds(t['lag_seconds'])}, {t['delivered_per_second']:.1f}/s"
            + (f", {t['held']} held" if t["held"] else "")
        )
    blocked = report["blocked_keys"]
    click.echo(f"keys blocked by a FAILED (or SENT) row: {report['blocked_key_count']}")
    for b in blocked:
        click.echo(
            f"  key {b['key']}: FAILED row {b['first_failed']}, {b['held']} rows held "
            f"behind it  (outbox show {b['first_failed']})"
        )
    click.echo(f"relays alive: {len(report['relays'])}")
    for r in report["relays"]:
        click.echo(
            f"  {r['name']}: {r['buckets']} buckets, heartbeat {_age(r['heartbeat_at'])} ago"
        )
    for p in report.get("problems", []):
        click.echo(f"PROBLEM: {p}")


@main.command(name="list")
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
    from .operations import list_rows

    selection = _selection(refs, statuses, topic, key, key_hex, since, until, error, expired_claims)
    with _connect(dsn) as conn:
        require_schema(conn, schema)
        rows = list_rows(conn, schema, selection, limit, after_id)
    if as_json:
        click.echo(json.dumps(_jsonable(rows), indent=2))
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
                f"{_age(r['created_at']):>7}  {_waits(r):<16} {err[:60]}"
            )
        if len(rows) == limit:
            click.echo(f"(more: --after-id {rows[-1]['id']})")
    if not rows:  # like grep: a script can tell "nothing matches" from the exit status
        raise Failure(f"no message matches {_described(selection)}".strip())


@main.command()
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
    from .operations import get_row

    parsed = parse_ref(ref)  # a usage error before any connection
    with _connect(dsn) as conn:
        require_schema(conn, schema)
        row = get_row(conn, schema, parsed)
    if row is None:
        raise Failure(f"no message {ref}")
    if as_json:
        out = dict(row)
        out["payload"], out["payload_encoding"] = _payload_for_json(row["payload"])
        out["headers"] = [[k, key_text(v) if v is not None else None] for k, v in row["headers"]]
        click.echo(json.dumps(_jsonable(out), indent=2))
        return
    lines = [
        ("id", row["id"]),
        ("message_id", row["message_id"]),
        ("status", row["status"]),
        ("topic", row["topic"]),
        ("key", key_text(row["key"])),
        ("bucket", row["bucket"]),
        ("attempts", row["attempts"]),
        ("next attempt", row["next_attempt_at"] or "-"),
        ("last error", row["last_error"] or "-"),
        ("created", f"{row['created_at']} ({_age(row['created_at'])} ago)"),
        ("delivered", row["delivered_at"] or "-"),
        (
            "kafka",
            f"partition {row['kafka_partition']}, offset {row['kafka_offset']}"
            if row["kafka_offset"] is not None
            else "-",
        ),
        ("dedup key", row["dedup_key"] or "-"),
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
    click.echo(_show_payload(row["payload"]))


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
        since,
        until,
        error,
        expired_claims,
        dry_run,
        yes,
        actor,
        reason,
    ):
        from . import operations

        selection = _selection(
            refs, statuses, topic, key, key_hex, since, until, error, expired_claims
        )
        if selection.is_empty():
            raise Failure(
                f"say what to {action}: ids, --status, --topic, --key, --since ...", EXIT_USAGE
            )
        operations.check_change(action, selection)
        with _connect(dsn) as conn:
            require_schema(conn, schema)
            counts = operations.count_rows(conn, schema, selection)
            total = operations.count_changeable(conn, schema, selection, action)
            if not counts:
                raise Failure(f"{action}: no message matches {_described(selection)}")
            sample = operations.list_rows(conn, schema, selection, limit=5)
            matched = sum(counts.values())
            click.echo(
                f"{action}: {total} messages match "
                f"({', '.join(f'{st} {n}' for st, n in counts.items())})"
                if total == matched
                else f"{action}: {total} of {matched} matching messages can be changed "
                f"({', '.join(f'{st} {n}' for st, n in counts.items())}): "
                + (
                    "skip takes FAILED rows"
                    if action == "skip"
                    else "PENDING rows never tried are on their way already, SENT rows wait "
                    "for their claim to expire"
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
            _confirm(f"{action.capitalize()} these {total} messages?", yes)
            with click.progressbar(length=total, label=action, file=sys.stderr) as bar:
                do = operations.replay if action == "replay" else operations.skip
                changed = do(
                    conn, schema, selection, actor or _default_actor(), reason, progress=bar.update
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


@main.command()
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


@main.command()
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


@main.command()
@dsn_option
@schema_option
@click.option(
    "--older-than",
    required=True,
    metavar="AGE",
    help="Delete rows created more than AGE ago (30m, 12h, 7d ...).",
)
@click.option("--include-skipped", is_flag=True, help="Delete SKIPPED rows too.")
@click.option("--dry-run", is_flag=True, help="Count only.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--actor", default=None, help="Who does it, for the audit trail [user@host].")
@click.option("--reason", default=None, help="Why, for the audit trail.")
@expected_failures
def purge(dsn, schema, older_than, include_skipped, dry_run, yes, actor, reason) -> None:
    """Delete old CONFIRMED (and, if asked, SKIPPED) rows in small batches.

    Never PENDING, SENT or FAILED rows. Each batch of 1,000 is its own short transaction,
    with its audit entry.

    \b
    Examples:
      outbox purge --older-than 7d --dry-run
      outbox purge --older-than 30d --include-skipped --yes --reason "retention: 30 days"
    """
    from . import operations

    cutoff = dt.datetime.now(dt.timezone.utc) - parse_duration(older_than)
    statuses = operations.purge_statuses(include_skipped)
    with _connect(dsn) as conn:
        require_schema(conn, schema)
        total = operations.purge_count(conn, schema, statuses, cutoff)
        click.echo(
            f"purge: {total} {' and '.join(statuses)} rows created before "
            f"{cutoff.isoformat(timespec='seconds')}"
        )
        if dry_run or total == 0:
            return
        _confirm(f"Delete these {total} rows?", yes)
        with click.progressbar(length=total, label="purge", file=sys.stderr) as bar:
            deleted = operations.purge(
                conn,
                schema,
                statuses,
                cutoff,
                actor or _default_actor(),
                reason,
                progress=bar.update,
            )
    click.echo(f"purge: {deleted} rows deleted")


@main.command()
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

    from .kafka import KafkaRecordSource
    from .prefetch import Prefetch
    from .reconcile import EXIT_UNCHECKED, Reconciler
    from .reconcile_rows import AHEAD, RowPages, Window

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
        kafka=_kafka_settings(kafka_settings),
    )
    secrets = secrets_of(cfg)
    with _kafka_failures(cfg, unreachable=EXIT_UNCHECKED):
        source = KafkaRecordSource(cfg.producer_config(), timeout=timeout)
    try:
        problem = source.check(min(timeout, 10.0))
        if problem:
            raise Failure(
                redact_text(f"cannot reach Kafka at {cfg.bootstrap_servers}: {problem}", *secrets),
                EXIT_UNCHECKED,
            )
        try:
            conn = _connect(dsn)  # a malformed DSN was refused above, by RelayConfig
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


@main.group()
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

    from .operations import inbox_purge as purge_audited

    age = parse_duration(older_than)
    if age <= dt.timedelta(0):
        raise Failure("--older-than must be more than 0", EXIT_USAGE)
    whose = f"of group {group!r}" if group else "of every group"
    with _connect(dsn) as conn:
        require_schema(conn, schema)
        total = count_old(conn, age, group=group, schema=schema)
        click.echo(f"inbox purge: {total} rows {whose} processed more than {older_than} ago")
        if dry_run or total == 0:
            return
        _confirm(f"Delete these {total} rows?", yes)
        deleted = purge_audited(
            conn, schema, age, group, actor or _default_actor(), reason, older_than
        )
    click.echo(f"inbox purge: {deleted} rows deleted")


AUDIT_ACTIONS = ("replay", "skip", "purge", "inbox-purge")


@main.group(invoke_without_command=True)
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
    from .operations import audit_log
    from .selection import parse_time

    since_at = parse_time(since) if since else None  # usage errors before any connection
    until_at = parse_time(until) if until else None
    with _connect(dsn) as conn:
        require_schema(conn, schema)
        entries = audit_log(conn, schema, limit, list(actions), actor, since_at, until_at)
    if as_json:
        click.echo(json.dumps(_jsonable(entries), indent=2))
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
    from .audit import parse_head
    from .operations import verify_audit

    dsn, schema = _group_value(ctx, "dsn", dsn), _group_value(ctx, "schema", schema)
    try:
        expected = parse_head(expect_head) if expect_head is not None else None
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    with _connect(dsn) as conn:
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


@main.command()
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
    callback=_valid_shards,
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
    from .doctor import run_checks

    check_dsn(dsn)  # no DSN at all: say so, rather than try the local socket
    kafka = _kafka_settings(kafka_settings)
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


@main.command()
@schema_option
@click.option("--role", required=True, help="The database role to grant to.")
@click.option(
    "--for",
    "kind",
    type=click.Choice(["relay", "writer", "operator", "consumer"]),
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
    from psycopg import sql as pgsql

    from outbox.sql import read_blocks

    names = [kind] + (["relay_retention"] if retention and kind == "relay" else [])
    blocks = read_blocks("relay", "grants.sql")
    for name in names:
        text = pgsql.SQL(blocks[name]).format(
            schema=pgsql.Identifier(validate_identifier(schema)),
            role=pgsql.Identifier(validate_identifier(role, "role")),
        )
        click.echo(text.as_string(None))


@main.command()
@dsn_option
@schema_option
@bootstrap_option
@kafka_option
@click.option("--name", default=None, help="Relay name in status and logs [host-pid].")
@click.option("--batch-size", type=int, default=None, help="Rows per batch [2000].")
@click.option("--no-listen", is_flag=True, help="Do not LISTEN for NOTIFY; poll only.")
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve /metrics, /healthz and /readyz on this port [off].",
)
@click.option("--dead-letter-topic", default=None, help="Copy rows that become FAILED here.")
@click.option(
    "--retention",
    "retention_seconds",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Delete CONFIRMED rows older than this, in small batches [keep all].",
)
@click.option(
    "--delivery",
    type=click.Choice(DELIVERY_MODES),
    default=None,
    help="exactly-once: Kafka transactions with progress records [at-least-once].",
)
@click.option(
    "--shards", type=int, default=None, help="Exactly-once: shards of the 256 buckets [4]."
)
@click.option(
    "--progress-topic", default=None, help="Exactly-once: the progress topic [outbox-progress]."
)
@click.option("--once", is_flag=True, help="Deliver until nothing is pending, then exit.")
@click.option("--log-json", is_flag=True, default=None, help="One JSON object per log line.")
@expected_failures
def relay(
    dsn,
    schema,
    bootstrap_servers,
    kafka_settings,
    name,
    batch_size,
    no_listen,
    metrics_port,
    dead_letter_topic,
    retention_seconds,
    delivery,
    shards,
    progress_topic,
    once,
    log_json,
) -> None:
    """Deliver pending events to Kafka until SIGTERM or SIGINT.

    Every setting also reads an OUTBOX_* environment variable (OUTBOX_BATCH_SIZE,
    OUTBOX_LEASE_SECONDS ...); librdkafka settings read OUTBOX_KAFKA_* (OUTBOX_KAFKA_SASL_USERNAME
    is sasl.username). See docs/configuration.md.

    \b
    Examples:
      outbox relay -b kafka:9092 --metrics-port 9108
      outbox relay -b kafka:9092 --delivery exactly-once   (after outbox migrate --kafka)
      outbox relay -X security.protocol=SASL_SSL -X sasl.mechanisms=PLAIN \\
                   -X sasl.username=relay -X sasl.password=...
    """
    from .logs import configure_logging
    from .runner import run_relay

    cfg = RelayConfig.from_env(
        dsn=dsn or None,
        schema=schema,
        bootstrap_servers=bootstrap_servers or None,
        name=name,
        batch_size=batch_size,
        listen=False if no_listen else None,
        metrics_port=metrics_port,
        dead_letter_topic=dead_letter_topic,
        retention_seconds=retention_seconds,
        delivery=delivery,
        shards=shards,
        progress_topic=progress_topic,
        log_json=log_json,
        kafka=_kafka_settings(kafka_settings),
    )
    configure_logging(cfg.log_level, cfg.log_json, secrets_of(cfg))
    logging.getLogger("relay").info("configuration: %s", cfg.describe())
    stop = threading.Event()

    def on_signal(signum, _frame):
        logging.getLogger("relay").info("%s: draining and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        code = run_relay(cfg, stop, until_idle=once)
    except OutboxError as exc:
        raise Failure(redact_text(str(exc), *secrets_of(cfg))) from None
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
