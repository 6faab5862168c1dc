"""`outbox relay`: deliver pending events to Kafka until stopped."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from outbox.errors import OutboxError

from ..config import DELIVERY_MODES, RelayConfig, redact_text, secrets_of
from .failures import Failure, expected_failures
from .options import (
    bootstrap_option,
    dsn_option,
    kafka_option,
    parse_kafka_settings,
    schema_option,
)


@click.command()
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
@click.option(
    "--rate-limit",
    "rate_limits",
    multiple=True,
    metavar="SCOPE:NAME=RATE[:BURST]",
    help="Send at most RATE messages a second (BURST at once) of a tenant or a topic, across "
    "all relays; repeatable: tenant:acme=100, topic:payments=500:2000, tenant:-=50 (rows "
    "without a tenant).",
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
    rate_limits,
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
      outbox relay -b kafka:9092 --rate-limit tenant:acme=100 --rate-limit topic:sms=20:100
      outbox relay -X security.protocol=SASL_SSL -X sasl.mechanisms=PLAIN \\
                   -X sasl.username=relay -X sasl.password=...
    """
    from ..logs import configure_logging
    from ..runner import run_relay

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
        rate_limits=" ".join(rate_limits) or None,
        log_json=log_json,
        kafka=parse_kafka_settings(kafka_settings),
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
