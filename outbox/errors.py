"""The errors the writer side raises. Callers can catch at the level they care about."""


class OutboxError(Exception):
    """Base of every error raised by outbox-relay."""


class InvalidMessage(OutboxError, ValueError):
    """The event cannot be delivered as given; nothing was written."""


class InvalidTopic(InvalidMessage):
    """The topic name breaks Kafka's rules."""


class MessageTooLarge(InvalidMessage):
    """Payload, key and headers together exceed the configured maximum."""


class NotInTransaction(OutboxError):
    """publish() (or inbox.record()) was called where its row would not commit with the
    caller's other writes."""


class SchemaError(OutboxError):
    """The outbox tables are missing or of another version."""


class InboxError(OutboxError):
    """A consumed record could not be recorded in the inbox (no valid message_id, say) or its
    handler kept failing: nothing was recorded and its offset was not stored. TOPIC,
    PARTITION and OFFSET say which record (None when unknown)."""

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ):
        super().__init__(message)
        self.topic, self.partition, self.offset = topic, partition, offset


class HandlerFailed(InboxError):
    """InboxConsumer gave up on a record after max_attempts failed attempts; the last error is
    the __cause__."""
