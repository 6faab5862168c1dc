"""Wires a Relay from a RelayConfig: the real store, sink and listener, startup checks."""

from __future__ import annotations

import logging
import threading

import psycopg
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from outbox.errors import OutboxError

from .config import RelayConfig, redact_dsn, redact_text, secrets_of
from .kafka import KafkaSink
from .listener import Listener
from .relay import Relay
from .retry import RetryPolicy
from .store import PostgresStore

log = logging.getLogger(__name__)


def _retryable(exc: BaseException) -> bool:
    # Wrong password or database: retrying will not help; say so at once.
    text = str(exc).lower()
    return isinstance(exc, psycopg.OperationalError) and not any(
        word in text for word in ("password", "authentication", "does not exist", "no pg_hba")
    )


def connect_store(cfg: RelayConfig, startup_timeout: float = 30.0) -> PostgresStore:
    store = PostgresStore(cfg.dsn, cfg.schema)
    try:
        for attempt in Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_delay(startup_timeout),
            wait=wait_exponential(multiplier=0.5, max=5),
            reraise=True,
            before_sleep=lambda rs: log.warning(
                "PostgreSQL not reachable yet (%s), retrying",
                redact_text(str(rs.outcome.exception()).strip(), *secrets_of(cfg)),
            ),
        ):
            with attempt:
                store.connect()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OutboxError(
            f"cannot connect to {redact_dsn(cfg.dsn)}: {redact_text(first, *secrets_of(cfg))}"
        ) from None
    return store


def build_relay(cfg: RelayConfig) -> tuple[Relay, Listener | None]:
    store = connect_store(cfg)
    sink = KafkaSink(cfg.producer_config(), flush_timeout=cfg.flush_timeout)
    listener = Listener(cfg.dsn, cfg.schema) if cfg.listen else None
    relay = Relay(
        store,
        sink,
        name=cfg.name,
        batch_size=cfg.batch_size,
        lease_seconds=cfg.lease_seconds,
        heartbeat_interval=cfg.heartbeat_interval,
        flush_timeout=cfg.flush_timeout,
        idle_poll_interval=cfg.idle_poll_interval,
        retry=RetryPolicy(cfg.max_attempts, cfg.backoff_base, cfg.backoff_max),
        wait_for_work=listener.wait if listener else None,
    )
    return relay, listener


def run_relay(cfg: RelayConfig, stop: threading.Event, until_idle: bool = False) -> int:
    relay, listener = build_relay(cfg)
    try:
        if until_idle:
            while not stop.is_set() and relay.run_once() > 0:
                pass
            relay._shutdown()
        else:
            relay.run(stop)
    finally:
        relay.sink.close(cfg.shutdown_timeout)
        relay.store.close()
        if listener:
            listener.close()
    return 0
