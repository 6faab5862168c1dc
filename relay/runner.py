"""Wires a Relay from a RelayConfig: the real store, sink, listener and health server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import psycopg
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from outbox.errors import OutboxError

from .config import ConfigError, RelayConfig, first_line, redact_dsn, redact_text, secrets_of
from .health import HealthServer
from .kafka import (
    KafkaSink,
    TransactionalSink,
    check_kafka,
    check_progress_topic,
    check_transactions,
)
from .listener import Listener
from .model import LoopSettings, Sink
from .outage_log import OutageLog
from .promoter import Promoter
from .rate_limits import RateLimit, throttle_wait
from .relay import Relay
from .retention import Retention
from .retry import RetryPolicy
from .store import PostgresStore

log = logging.getLogger(__name__)


def _retryable(exc: BaseException) -> bool:
    # Wrong password or database: retrying will not help; say so at once.
    text = str(exc).lower()
    return isinstance(exc, psycopg.OperationalError) and not any(
        word in text for word in ("password", "authentication", "does not exist", "no pg_hba")
    )


def _first_line(exc: BaseException, cfg: RelayConfig) -> str:
    return redact_text(first_line(exc), *secrets_of(cfg))


def connect_store(cfg: RelayConfig, startup_timeout: float = 30.0) -> PostgresStore:
    """A connected store; PostgreSQL not up yet is retried (tenacity) for STARTUP_TIMEOUT."""
    store = PostgresStore(cfg.dsn, cfg.schema, shards=cfg.lease_shards)

    def warn(rs: RetryCallState) -> None:
        # tenacity sleeps only after an attempt that raised (retry_if_exception): outcome has it.
        assert rs.outcome is not None
        exc = rs.outcome.exception()
        assert exc is not None
        log.warning("PostgreSQL not reachable yet (%s), retrying", _first_line(exc, cfg))

    try:
        for attempt in Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_delay(startup_timeout),
            wait=wait_exponential(multiplier=0.5, max=5),
            reraise=True,
            before_sleep=warn,
        ):
            with attempt:
                store.connect()
    except psycopg.Error as exc:
        raise OutboxError(
            f"cannot connect to {redact_dsn(cfg.dsn)}: {_first_line(exc, cfg)}"
        ) from None
    return store


def readiness(cfg: RelayConfig):
    """A check of PostgreSQL and Kafka for /readyz: {name: None if fine, else why not}."""

    def check() -> dict[str, str | None]:
        result: dict[str, str | None] = {}
        try:
            with psycopg.connect(cfg.dsn, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            result["postgresql"] = None
        except Exception as exc:  # noqa: BLE001
            result["postgresql"] = _first_line(exc, cfg)
        problem = check_kafka(cfg.producer_config(), timeout=2.0)
        result["kafka"] = redact_text(problem, *secrets_of(cfg)) if problem else None
        return result

    return check


def check_exactly_once(cfg: RelayConfig) -> None:
    """Refuse to start exactly-once delivery, with one line saying why, on a cluster that
    cannot give it: no transactions, or no usable progress topic."""
    problem = check_progress_topic(
        cfg.producer_config(), cfg.progress_topic, cfg.shards
    ) or check_transactions(
        cfg.producer_config(), cfg.transactional_id_prefix, cfg.flush_timeout, cfg.progress_topic
    )
    if problem:
        raise ConfigError(f"exactly-once delivery: {redact_text(problem, *secrets_of(cfg))}")


def build_sinks(cfg: RelayConfig, outage_log: OutageLog) -> tuple[Sink, Sink]:
    """The sink of the configured delivery mode, and the one for dead letters."""
    plain = KafkaSink(
        cfg.producer_config(),
        flush_timeout=cfg.flush_timeout,
        metadata_timeout=cfg.metadata_timeout,
        max_message_bytes=cfg.max_message_bytes,
        outage_log=outage_log,
    )
    if not cfg.exactly_once:
        return plain, plain
    # Dead letters go through a plain producer: a progress record names outbox rows only.
    transactional = TransactionalSink(
        cfg.producer_config(),
        shards=cfg.shards,
        progress_topic=cfg.progress_topic,
        transactional_id_prefix=cfg.transactional_id_prefix,
        flush_timeout=cfg.flush_timeout,
        metadata_timeout=cfg.metadata_timeout,
        max_message_bytes=cfg.max_message_bytes,
        outage_log=outage_log,
    )
    return transactional, plain


def put_limits_in_force(store: PostgresStore, limits: Sequence[RateLimit], schema: str) -> None:
    """Refuse a limit for an unknown tenant, neither registered nor with rows waiting (a
    misspelt name would leave the real tenant unlimited); put the limits in force for every
    relay (relay.rate_limits)."""
    tenants = [limit.name for limit in limits if limit.scope == "tenant" and limit.name]
    unknown = sorted(set(tenants) - store.known_tenants(tenants))
    if unknown:
        raise ConfigError(
            f"rate_limits: unknown tenant {', '.join(map(repr, unknown))}: no relay has "
            "delivered its events and none wait (a misspelt tenant would never be limited); "
            "to limit a tenant before its first event, register it: INSERT INTO "
            f"{schema}.local_message_tenant (tenant) VALUES ('...')"
        )
    store.set_rate_limits(limits)


def build_relay(cfg: RelayConfig) -> tuple[Relay, Listener | None]:
    if cfg.exactly_once:
        check_exactly_once(cfg)
    store = connect_store(cfg)
    limits = cfg.limits
    if limits:
        try:
            put_limits_in_force(store, limits, cfg.schema)
        except BaseException:
            store.close()
            raise
    # A second connection: the next batch is read while the outcomes are written (relay.relay).
    reader = PostgresStore(cfg.dsn, cfg.schema)  # connects on its first read
    outage_log = OutageLog(logging.getLogger("relay.kafka"))
    sink, dead_letter_sink = build_sinks(cfg, outage_log)
    listener = Listener(cfg.dsn, cfg.schema) if cfg.listen else None
    settings = LoopSettings(
        batch_size=cfg.batch_size,
        lease_seconds=cfg.lease_seconds,
        heartbeat_interval=cfg.heartbeat_interval,
        flush_timeout=cfg.flush_timeout,
        idle_poll_min=cfg.idle_poll_min,
        idle_poll_interval=cfg.idle_poll_interval,
        dead_letter_topic=cfg.dead_letter_topic,
        shards=cfg.shards if cfg.exactly_once else 0,
    )
    relay = Relay(
        store,
        sink,
        name=cfg.name,
        settings=settings,
        retry=RetryPolicy(
            cfg.max_attempts, cfg.backoff_base, cfg.backoff_max, cfg.max_permanent_attempts
        ),
        wait_for_work=listener.wait if listener else None,
        outage_log=outage_log,
        reader=reader,
        dead_letter_sink=dead_letter_sink,
        rate_limits=limits,
    )
    return relay, listener


def run_relay(cfg: RelayConfig, stop: threading.Event, until_idle: bool = False) -> int:
    relay, listener = build_relay(cfg)
    health = None
    retention = None
    promoter = None
    halt = threading.Event()  # the services' own stop: set whatever way the loop ends
    threads: list[threading.Thread] = []
    try:
        # Scheduled rows become PENDING beside the loop, on a connection of their own
        # (relay.promoter says why), as retention's old rows are deleted.
        promoter = Promoter(connect_store(cfg), on_count=relay.metrics.scheduled.set)
        if cfg.retention_seconds:
            # Beside the loop, on a connection of its own (relay.retention says why).
            retention = Retention(connect_store(cfg), cfg.retention_seconds)
        if cfg.metrics_port:
            try:
                health = HealthServer(
                    cfg.metrics_host,
                    cfg.metrics_port,
                    relay.metrics.registry,
                    seconds_since_progress=lambda: relay.clock.monotonic() - relay.last_progress,
                    readiness=readiness(cfg),
                    stuck_after=max(60.0, cfg.flush_timeout * 2),
                ).start()
            except OSError as exc:
                raise ConfigError(
                    f"metrics_port: cannot serve on {cfg.metrics_host}:{cfg.metrics_port} "
                    f"({exc.strerror or exc})"
                ) from None
    except BaseException:
        for service in (retention, promoter):
            if service:
                service.store.close()
        relay.close_stores()
        if listener:
            listener.close()
        raise
    try:
        if until_idle:
            try:
                # The rows due by now are delivered with the rest; later ones stay SCHEDULED.
                while promoter.run_once(stop) >= promoter.batch * promoter.rounds:
                    pass  # a round stops at its bound: every row due by now, however many
                while not stop.is_set():
                    if relay.run_once() > 0:
                        continue
                    if relay.throttled_for is None:
                        break  # nothing left, nothing held back by a rate limit
                    relay.clock.wait(stop, throttle_wait(relay.throttled_for))
            finally:
                relay.shutdown()
            if retention:
                retention.run_once(stop)
        else:
            threads = [service.start(halt) for service in (promoter, retention) if service]
            relay.run(stop)
    finally:
        # Whatever ended the loop ends the services too; a service's connection is closed
        # only once its thread is done with it (a batch is one short statement, bounded by
        # statement_timeout).
        halt.set()
        for thread in threads:
            thread.join(timeout=cfg.shutdown_timeout)
        alive = {thread.name for thread in threads if thread.is_alive()}
        for name, service in (("promoter", promoter), ("retention", retention)):
            if service and name not in alive:
                service.store.close()
        relay.sink.close(cfg.shutdown_timeout)
        if relay.dead_letter_sink is not relay.sink:
            relay.dead_letter_sink.close(cfg.shutdown_timeout)
        relay.close_stores()
        if listener:
            listener.close()
        if health:
            health.stop()
    return 0
