"""What the package's clients share: what a Kafka error means for a message (classify,
describe), the settings any client needs (client_settings, new_client), the producers' error
callback, and a message's size as a record."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException

from outbox.message import record_size

from ..config import ConfigError
from ..model import FailureKind, PendingMessage
from ..outage_log import OutageLog

# Errors that say "this message cannot be delivered as it is", whatever the cluster's health.
PERMANENT_ERRORS = {
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._INVALID_ARG,
}

# Errors that say "the cluster is not reachable or not taking writes now".
_OUTAGE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError._PURGE_QUEUE,
    # The producer takes no messages in its state (a transaction failed and awaits its abort):
    # not the message's fault.
    KafkaError._STATE,
}

# Errors after which the message may or may not be in Kafka (librdkafka INTRODUCTION.md,
# "Message timeout considerations"): retried, never counted as failed-and-safe.
_UNKNOWN = {
    KafkaError._MSG_TIMED_OUT,
    KafkaError._PURGE_INFLIGHT,
    KafkaError._FATAL,
    # Idempotence state errors: the message may have been written ("possibly persisted").
    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_EPOCH,
}


def classify(err: KafkaError) -> FailureKind:
    code = err.code()
    if err.fatal() or code in _UNKNOWN:
        return FailureKind.UNKNOWN
    if code in PERMANENT_ERRORS:
        return FailureKind.PERMANENT
    if code in _OUTAGE:
        return FailureKind.OUTAGE
    return FailureKind.TRANSIENT


def describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


#: Settings an AdminClient shares with the producer (connection and security).
_CLIENT_PREFIXES = (
    "bootstrap.",
    "security.",
    "sasl.",
    "ssl.",
    "socket.",
    "client.",
    "broker.",
    "metadata.",
    "reconnect.",
    "connections.",
    "api.",
    "debug",
)


def client_settings(config: Mapping[str, str]) -> dict[str, str | int | float | bool]:
    """The settings of CONFIG that any client needs (connection and security): what an
    AdminClient, a consumer or a throwaway producer shares with the relay's producer."""
    return {k: v for k, v in config.items() if k.startswith(_CLIENT_PREFIXES)}


_Client = TypeVar("_Client")


class KafkaSettingsError(ConfigError):
    """librdkafka refused a client's settings (an unknown property, a value out of range, a
    file it cannot load): the configuration's fault, so exit 2 and one line, not a traceback."""


def new_client(kind: Callable[..., _Client], settings: Mapping[str, object], **kwargs) -> _Client:
    """KIND (Consumer, AdminClient, Producer) built from SETTINGS; a setting librdkafka
    refuses raises KafkaSettingsError, saying which one. Nothing is connected yet here, so
    any failure is the settings'."""
    try:
        return kind(settings, **kwargs)
    except KafkaException as exc:
        err = exc.args[0]
        why = err.str() if isinstance(err, KafkaError) else str(err)
    except (ValueError, TypeError) as exc:  # confluent-kafka's own checks of a value's type
        why = str(exc)
    raise KafkaSettingsError(f"Kafka settings refused: {why}") from None


def report_client_error(outage_log: OutageLog, err: KafkaError) -> None:
    """The producers' error_cb: client-level errors (brokers down, authentication), each
    distinct one logged once through the outage log. Fatal errors do not come here:
    confluent-kafka raises them from poll()/flush() (see KafkaSink._serve)."""
    outage_log.problem(err.name(), logging.WARNING, f"Kafka: {describe(err)}")


def message_size(message: PendingMessage) -> int:
    """The bytes of a message as a record, as the writer and librdkafka count them."""
    if not message.headers and not message.tenant:  # the common case, without a call per message
        return _EMPTY_RECORD + len(message.payload) + (len(message.key) if message.key else 0)
    return record_size(message.key, message.payload, message.headers, message.tenant)


#: A record with no key, no payload and no headers of its own: record_size is linear in them.
_EMPTY_RECORD = record_size(None, b"")
