"""The `outbox` command: what operators run."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading

import click
import psycopg

from outbox.errors import OutboxError
from outbox.schema import apply_schema, installed_version
from outbox.sql import schema_sql

from .config import ConfigError, RelayConfig, redact_dsn, redact_text, secrets_of

EXIT_OK, EXIT_CONDITION, EXIT_USAGE = 0, 1, 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _connect(dsn: str) -> psycopg.Connection:
    if not dsn:
        _fail("no database: set --dsn or OUTBOX_DSN")
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                               application_name="outbox-cli")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(f"cannot connect to {redact_dsn(dsn)}: {redact_text(first, *_dsn_secrets(dsn))}",
              EXIT_CONDITION)


def _dsn_secrets(dsn: str) -> list[str]:
    return secrets_of(RelayConfig(dsn=dsn))


dsn_option = click.option(
    "--dsn", envvar="OUTBOX_DSN", default="", show_envvar=True,
    help="PostgreSQL connection string (its password is never printed).",
)
schema_option = click.option(
    "--schema", envvar="OUTBOX_SCHEMA", default="public", show_default=True, show_envvar=True,
    help="Schema that holds local_message.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Transactional outbox for PostgreSQL, delivered to Kafka.

    \b
    Examples:
      outbox migrate                     create or upgrade the tables
      outbox relay                       deliver pending events to Kafka
      outbox status                      counts by status and the oldest pending age
    """


@main.command()
@dsn_option
@schema_option
@click.option("--print", "print_sql", is_flag=True,
              help="Write the schema's SQL to stdout instead of applying it.")
def migrate(dsn: str, schema: str, print_sql: bool) -> None:
    """Create or upgrade the outbox tables and print the schema version.

    \b
    Examples:
      outbox migrate --dsn postgresql://app@db/app
      outbox migrate --schema payments
      outbox migrate --print > V42__outbox.sql
    """
    if print_sql:
        click.echo(schema_sql(), nl=False)
        return
    conn = _connect(dsn)
    try:
        before = installed_version(conn, schema)
        version = apply_schema(conn, schema)
    except (OutboxError, psycopg.Error) as exc:
        _fail(str(exc).strip().splitlines()[0], EXIT_CONDITION)
    finally:
        conn.close()
    if before == version:
        click.echo(f"outbox schema {schema!s}: version {version} (already up to date)")
    else:
        click.echo(f"outbox schema {schema!s}: version {version} (was {before or 'absent'})")


@main.command()
@dsn_option
@schema_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(dsn: str, schema: str, as_json: bool) -> None:
    """Counts by status and topic, and the age of the oldest pending row.

    \b
    Examples:
      outbox status
      outbox status --json | jq .counts
    """
    from .status import read_status

    conn = _connect(dsn)
    try:
        report = read_status(conn, schema)
    except (OutboxError, psycopg.Error) as exc:
        _fail(str(exc).strip().splitlines()[0], EXIT_CONDITION)
    finally:
        conn.close()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"schema {schema}: version {report['schema_version']}")
    for st, count in report["counts"].items():
        click.echo(f"  {st:<10} {count}")
    age = report["oldest_pending_age_seconds"]
    click.echo(f"oldest pending: {'-' if age is None else f'{age:.1f}s'}")
    for topic, counts in report["by_topic"].items():
        click.echo(f"  topic {topic}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    click.echo(f"relays alive: {len(report['relays'])}")
    for r in report["relays"]:
        click.echo(f"  {r['name']} ({r['relay_id']}): {r['buckets']} buckets")


@main.command()
@dsn_option
@schema_option
@click.option("--bootstrap-servers", "-b", envvar="OUTBOX_BOOTSTRAP_SERVERS", default="",
              show_envvar=True, help="Kafka bootstrap servers.")
@click.option("-X", "kafka_settings", multiple=True, metavar="KEY=VALUE",
              help="librdkafka producer setting, repeatable (sasl.*, ssl.*, linger.ms ...).")
@click.option("--name", default=None, help="Relay name in status and logs [host-pid].")
@click.option("--batch-size", type=int, default=None, help="Rows per batch [2000].")
@click.option("--no-listen", is_flag=True, help="Do not LISTEN for NOTIFY; poll only.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve /metrics, /healthz and /readyz on this port [off].")
@click.option("--dead-letter-topic", default=None, help="Copy rows that become FAILED here.")
@click.option("--retention", "retention_seconds", type=float, default=None, metavar="SECONDS",
              help="Delete CONFIRMED rows older than this, in small batches [keep all].")
@click.option("--once", is_flag=True, help="Deliver until nothing is pending, then exit.")
@click.option("--log-json", is_flag=True, default=None, help="One JSON object per log line.")
def relay(dsn, schema, bootstrap_servers, kafka_settings, name, batch_size, no_listen,
          metrics_port, dead_letter_topic, retention_seconds, once, log_json) -> None:
    """Deliver pending events to Kafka until SIGTERM or SIGINT.

    Every option also reads an OUTBOX_* environment variable (OUTBOX_BATCH_SIZE,
    OUTBOX_LEASE_SECONDS ...); librdkafka settings read OUTBOX_KAFKA_* (OUTBOX_KAFKA_SASL_USERNAME
    is sasl.username).

    \b
    Examples:
      outbox relay -b kafka:9092
      outbox relay -X security.protocol=SASL_SSL -X sasl.mechanisms=PLAIN \\
                   -X sasl.username=relay -X sasl.password=...
    """
    from .logs import configure_logging
    from .runner import run_relay

    kafka = {}
    for item in kafka_settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"-X needs KEY=VALUE, got {item.split('=')[0]!r}")
        kafka[key.strip()] = value
    try:
        cfg = RelayConfig.from_env(
            dsn=dsn or None, schema=schema, bootstrap_servers=bootstrap_servers or None,
            name=name, batch_size=batch_size, listen=False if no_listen else None,
            metrics_port=metrics_port, dead_letter_topic=dead_letter_topic,
            retention_seconds=retention_seconds, log_json=log_json, kafka=kafka,
        )
    except ConfigError as exc:
        _fail(f"invalid configuration: {exc}")
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
        _fail(redact_text(str(exc), *secrets_of(cfg)), EXIT_CONDITION)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
