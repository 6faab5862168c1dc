"""outbox: write events in the same PostgreSQL transaction as the business change.

    with conn.transaction():
        conn.execute("UPDATE account SET balance = balance - 10 WHERE id = 1")
        outbox.publish(conn, topic="payments", key="account-1", payload={"debited": 10})

The relay (``outbox relay``) then delivers every committed event to Kafka. Consumers skip
the copies delivered again with the inbox (``outbox.inbox``, ``outbox.consumer``).
"""

from .cloudevent import CloudEvent
from .errors import (
    HandlerFailed,
    InboxError,
    InvalidMessage,
    InvalidTopic,
    MessageTooLarge,
    NotInTransaction,
    OutboxError,
    SchemaError,
)
from .message import DEFAULT_MAX_MESSAGE_BYTES, OutboxMessage, build_message
from .schema import SCHEMA_VERSION, apply_schema, installed_version, require_schema
from .writer import Published, apublish, apublish_many, publish, publish_many

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "CloudEvent",
    "HandlerFailed",
    "InboxError",
    "InvalidMessage",
    "InvalidTopic",
    "MessageTooLarge",
    "NotInTransaction",
    "OutboxError",
    "OutboxMessage",
    "Published",
    "SchemaError",
    "apply_schema",
    "apublish",
    "apublish_many",
    "build_message",
    "installed_version",
    "publish",
    "publish_many",
    "require_schema",
]
