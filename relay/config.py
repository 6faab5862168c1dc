"""The relay's configuration: one object with defaults, validation, environment variables and
librdkafka passthrough. Invalid configuration fails at start with one clear line."""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from outbox.errors import OutboxError
from outbox.message import DEFAULT_MAX_MESSAGE_BYTES, validate_tenant, validate_topic
from outbox.sql import validate_identifier

from .model import BUCKETS, SEND_MARGIN, LoopSettings
from .rate_limits import NO_TENANT, SCOPES, RateLimit
from .retry import RetryPolicy
from .shards import MAX_PROGRESS_IDS, PROGRESS_BYTES_PER_ROW, validate_shards

#: The values of `delivery`.
DELIVERY_MODES = ("at-least-once", "exactly-once")

ENV_PREFIX = "OUTBOX_"
KAFKA_ENV_PREFIX = "OUTBOX_KAFKA_"

_SECRET_WORDS = ("password", "secret", "jaas", "token", "credential", "private", ".key.pem")


class ConfigError(ValueError):
    """The configuration cannot work; the message says which setting and why."""


def _default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class RelayConfig:
    dsn: str = ""
    bootstrap_servers: str = ""
    schema: str = "public"
    #: Shown in `outbox status` and the logs; defaults to host-pid.
    name: str = field(default_factory=_default_name)
    #: Rows read, produced and confirmed together.
    batch_size: int = LoopSettings.batch_size
    #: Idle polls start this often and slow down to idle_poll_interval while nothing comes
    #: (NOTIFY, when on, wakes the relay at once).
    idle_poll_min: float = LoopSettings.idle_poll_min
    idle_poll_interval: float = LoopSettings.idle_poll_interval
    #: LISTEN for the insert trigger's NOTIFY; polling stays the source of truth.
    listen: bool = True
    #: A relay that has not renewed its bucket leases for this long is taken over.
    lease_seconds: float = LoopSettings.lease_seconds
    heartbeat_interval: float = LoopSettings.heartbeat_interval
    #: The batch's deadline: what has no delivery report by then is taken back from the
    #: producer and sent again later (the producer has no timeout of its own).
    flush_timeout: float = LoopSettings.flush_timeout
    #: Longest wait for the metadata of a batch's topics not seen in the last minute.
    metadata_timeout: float = 10.0
    #: The largest record (payload, key, headers, framing) the producer takes; publish()'s
    #: default limit is the same number (outbox.message.DEFAULT_MAX_MESSAGE_BYTES).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Message-specific failures before a row becomes FAILED.
    max_attempts: int = RetryPolicy.max_attempts
    #: ... when the failure is one retrying cannot fix (no such topic, too large, not
    #: authorised): a few tries, in case it is fixed at once, then FAILED and visible.
    max_permanent_attempts: int = RetryPolicy.max_permanent_attempts
    backoff_base: float = RetryPolicy.base
    backoff_max: float = RetryPolicy.cap
    #: Longest wait for in-flight deliveries on SIGTERM.
    shutdown_timeout: float = 30.0
    #: Copy rows that become FAILED to this Kafka topic ("" = off).
    dead_letter_topic: str = LoopSettings.dead_letter_topic
    #: Delete CONFIRMED rows older than this many seconds, in small batches (0 = keep all).
    retention_seconds: float = 0.0
    #: Serve /metrics, /healthz and /readyz on this port (0: off).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_json: bool = False
    log_level: str = "INFO"
    #: "at-least-once", or "exactly-once": Kafka transactions, one transactional producer per
    #: shard of buckets, progress records on progress_topic (docs/guarantees.md, section 9).
    delivery: str = "at-least-once"
    #: Exactly-once: how many shards the 256 buckets form (it must divide 256), and the
    #: compacted topic with exactly that many partitions where their progress is recorded.
    #: Every relay of an outbox runs with the same delivery, shards, topic and prefix; change
    #: them only with every relay stopped (docs/operations.md).
    shards: int = 4
    progress_topic: str = "outbox-progress"
    #: Exactly-once: the producers' transactional.id is <prefix>-<shard>.
    transactional_id_prefix: str = "outbox-relay"
    #: Rate limits shared by every relay: `SCOPE:NAME=RATE[:BURST]` entries separated by
    #: commas or spaces (relay.rate_limits), e.g. "tenant:acme=100 topic:payments=500:2000".
    rate_limits: str = ""
    #: librdkafka settings, passed through to the producer (kcat-style -X key=value).
    kafka: dict[str, str] = field(default_factory=dict)

    # -- construction

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> RelayConfig:
        """Defaults, then OUTBOX_* environment variables, then OVERRIDES (None ones ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "kafka":
                continue
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        kafka = {
            k[len(KAFKA_ENV_PREFIX) :].lower().replace("_", "."): v
            for k, v in env.items()
            if k.startswith(KAFKA_ENV_PREFIX)
        }
        kafka.update(overrides.pop("kafka", None) or {})
        for k, v in overrides.items():
            if v is not None:
                values[k] = v
        cfg = cls(kafka=kafka, **values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_dsn(self.dsn)
        if not (self.bootstrap_servers or self.kafka.get("bootstrap.servers")):
            raise ConfigError("no Kafka: set --bootstrap-servers or OUTBOX_BOOTSTRAP_SERVERS")
        try:
            validate_identifier(self.schema)
        except OutboxError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("batch_size", "max_attempts", "max_permanent_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.retention_seconds < 0:
            raise ConfigError("retention_seconds must not be negative")
        if self.dead_letter_topic:
            try:
                validate_topic(self.dead_letter_topic)
            except ValueError as exc:
                raise ConfigError(f"dead_letter_topic: {exc}") from None
        if self.idle_poll_min > self.idle_poll_interval:
            raise ConfigError("idle_poll_min must not exceed idle_poll_interval")
        for name in (
            "idle_poll_min",
            "idle_poll_interval",
            "lease_seconds",
            "heartbeat_interval",
            "flush_timeout",
            "backoff_base",
            "backoff_max",
            "shutdown_timeout",
        ):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive number of seconds")
        if self.metadata_timeout >= self.flush_timeout:
            raise ConfigError(
                f"metadata_timeout ({self.metadata_timeout:g}s) must be below flush_timeout "
                f"({self.flush_timeout:g}s): the lookup is part of the batch"
            )
        for key, why in _OWNED_PRODUCER_SETTINGS.items():
            if key in self.kafka:
                raise ConfigError(f"{key} is set by the relay: {why}")
        if self.max_message_bytes < 1000:
            raise ConfigError("max_message_bytes must be at least 1000")
        # A relay must see its lease expire only after everything it produced has been
        # delivered or taken back; otherwise a new owner could send a key's later rows while an
        # earlier one of the old owner's is still in flight, and overtake it
        # (docs/guarantees.md, section 4).
        if self.lease_seconds <= self.flush_timeout + SEND_MARGIN + 2 * self.heartbeat_interval:
            raise ConfigError(
                f"lease_seconds ({self.lease_seconds:g}) must exceed flush_timeout "
                f"({self.flush_timeout:g}) plus {SEND_MARGIN:g}s to take back what is "
                f"unreported, plus two heartbeat intervals ({2 * self.heartbeat_interval:g})"
            )
        for k in ("enable.idempotence", "acks"):
            if k in self.kafka and self.kafka[k] not in ("true", "all", "-1"):
                raise ConfigError(f"{k}={self.kafka[k]} would give up delivery guarantees")
        if self.delivery not in DELIVERY_MODES:
            raise ConfigError(
                f"delivery must be one of {', '.join(DELIVERY_MODES)}, not {self.delivery!r}"
            )
        try:
            validate_shards(self.shards)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.exactly_once:
            try:
                validate_topic(self.progress_topic)
            except ValueError as exc:
                raise ConfigError(f"progress_topic: {exc}") from None
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.transactional_id_prefix):
                raise ConfigError(
                    "transactional_id_prefix must be 1-200 letters, digits, '.', '_' or '-'"
                )
            # A progress record names a batch and the batch before it (whose CONFIRMED may
            # still be being written): it must fit one record (relay.shards).
            if 2 * self.batch_size > MAX_PROGRESS_IDS or (
                2 * self.batch_size * PROGRESS_BYTES_PER_ROW + 100 > self.max_message_bytes
            ):
                raise ConfigError(
                    f"batch_size {self.batch_size} is too large for exactly-once delivery: "
                    f"a progress record names up to two batches, at most {MAX_PROGRESS_IDS} "
                    f"rows and {PROGRESS_BYTES_PER_ROW} bytes a row within max_message_bytes "
                    f"({self.max_message_bytes})"
                )
        try:
            parse_rate_limits(self.rate_limits)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level must be DEBUG, INFO, WARNING or ERROR")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port must be between 0 and 65535")

    @property
    def limits(self) -> tuple[RateLimit, ...]:
        """rate_limits, parsed (validate() has refused what does not parse)."""
        return parse_rate_limits(self.rate_limits)

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"

    @property
    def lease_shards(self) -> int:
        """In how many shards the store leases the buckets: single buckets at least once."""
        return self.shards if self.exactly_once else BUCKETS

    def producer_config(self) -> dict[str, str]:
        cfg = dict(self.kafka)
        if self.bootstrap_servers:
            cfg["bootstrap.servers"] = self.bootstrap_servers
        return cfg

    def describe(self) -> dict[str, object]:
        """The configuration as it may be logged: secrets replaced by ***."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kafka"}
        out["dsn"] = redact_dsn(self.dsn)
        out["kafka"] = redact_mapping(self.kafka)
        return out


#: librdkafka settings the relay sets itself, with the setting to use instead.
_OWNED_PRODUCER_SETTINGS = {
    "message.timeout.ms": "a batch's deadline is flush_timeout (OUTBOX_FLUSH_TIMEOUT); the "
    "producer has no timeout of its own, so that no message of a key can time out while a "
    "later one is delivered",
    "delivery.timeout.ms": "a batch's deadline is flush_timeout (OUTBOX_FLUSH_TIMEOUT)",
    "enable.gapless.guarantee": "per-key order rests on it",
    "message.max.bytes": "use max_message_bytes (OUTBOX_MAX_MESSAGE_BYTES), the same limit "
    "publish() applies",
    "retries": "a message whose retries run out leaves a gap later messages of its key could "
    "overtake; the producer retries until the batch's deadline",
    "message.send.max.retries": "the producer retries until the batch's deadline",
    "transactional.id": "exactly-once delivery (OUTBOX_DELIVERY=exactly-once) names its "
    "producers <transactional_id_prefix>-<shard>",
    "transaction.timeout.ms": "exactly-once delivery sets it from flush_timeout",
}


_LIMIT_RE = re.compile(r"(?P<scope>[a-z]+):(?P<name>[^=]*)=(?P<rate>[^:]*)(?::(?P<burst>.*))?")


def parse_rate_limits(spec: str | Iterable[str]) -> tuple[RateLimit, ...]:
    """Limits from SPEC: entries `SCOPE:NAME=RATE[:BURST]` (RATE messages a second, BURST at
    most at once, default max(RATE, 1)), separated by commas or spaces, or given one by one.
    Raises ValueError naming the entry at fault."""
    entries = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    limits: dict[tuple[str, str], RateLimit] = {}
    for entry in entries:
        limit = _parse_entry(entry.strip())
        if (limit.scope, limit.name) in limits:
            raise ValueError(f"rate limit {entry!r}: {limit.label} is limited twice")
        limits[(limit.scope, limit.name)] = limit
    return tuple(sorted(limits.values(), key=lambda limit: (limit.scope, limit.name)))


def _parse_entry(entry: str) -> RateLimit:
    match = _LIMIT_RE.fullmatch(entry)
    if not match:
        raise ValueError(
            f"rate limit {entry!r}: write SCOPE:NAME=RATE[:BURST], e.g. tenant:acme=100 or "
            "topic:payments=500:2000"
        )
    scope, name = match["scope"], match["name"]
    if scope not in SCOPES:
        raise ValueError(f"rate limit {entry!r}: the scope is tenant or topic, not {scope!r}")
    try:
        if scope == "tenant":
            name = "" if name == NO_TENANT else validate_tenant(name)
        else:
            validate_topic(name)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"rate limit {entry!r}: {exc}") from None
    rate = _number(entry, "rate", match["rate"])
    burst = max(rate, 1.0) if match["burst"] is None else _number(entry, "burst", match["burst"])
    if burst < 1:
        raise ValueError(
            f"rate limit {entry!r}: the burst must be at least 1 (a message takes one token)"
        )
    return RateLimit(scope, name, rate, burst)


def _number(entry: str, what: str, raw: str) -> float:
    try:
        value = float(raw.removesuffix("/s"))
    except ValueError:
        raise ValueError(f"rate limit {entry!r}: the {what} {raw!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"rate limit {entry!r}: the {what} must be a positive number of messages "
            f"(a second, for the rate), not {raw!r}"
        )
    return value


def _parse(name: str, kind: object, raw: str) -> object:
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw


def is_secret(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact_mapping(values: Mapping[str, str]) -> dict[str, str]:
    return {k: ("***" if is_secret(k) else v) for k, v in values.items()}


_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)


def check_dsn(dsn: str) -> None:
    """Refuse a DSN that can never connect (malformed, a port out of range) as a configuration
    error: retrying it, as the relay retries a database that is not up yet, cannot help."""
    if not dsn:
        raise ConfigError("no database: set --dsn or OUTBOX_DSN")
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        # Neither the DSN nor libpq's message: a DSN that does not parse may not be masked
        # right either (libpq quotes the word it stopped at, which can be part of a password
        # with a space in it). The names of the keys it has are enough to find the mistake.
        keys = sorted(set(re.findall(r"([A-Za-z_]+)\s*=", dsn.split("://", 1)[-1])))
        raise ConfigError(
            "dsn: malformed (neither a postgresql:// URL nor key=value pairs libpq accepts; "
            f"keys seen: {', '.join(keys) or 'none'}); quote values with spaces: "
            "password='...'"
        ) from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"dsn {redact_dsn(dsn)}: port {port!r} is not a TCP port")


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, in URL or key=value form."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            # The host part as written: parts.port would raise on a port out of range, the
            # very DSN an operator needs to see in the error.
            host = parts.netloc.rpartition("@")[2]
            netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
            parts = parts._replace(netloc=netloc)
        query = _KV_PASSWORD.sub(r"\1***", parts.query.replace("&", " ")).replace(" ", "&")
        return urlunsplit(parts._replace(query=query))
    return _KV_PASSWORD.sub(r"\1***", dsn)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (psycopg's and librdkafka's run on), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact_text(text: str, *secrets: str) -> str:
    """TEXT with every occurrence of the given secret values replaced by ***."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def secrets_of(cfg: RelayConfig) -> list[str]:
    """The secret values in CFG, for scrubbing error messages from libraries."""
    return [v for k, v in cfg.kafka.items() if is_secret(k)] + _dsn_secrets(cfg.dsn)


def _dsn_secrets(dsn: str) -> list[str]:
    values = []
    if "://" in dsn:
        password = urlsplit(dsn).password
        if password:
            values.append(password)
    for match in _KV_PASSWORD.finditer(dsn):
        values.append(match.group(2).strip("'"))
    return values
