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
    """publish() was called where the row would not commit with the business change."""


class SchemaError(OutboxError):
    """The outbox tables are missing or of another version."""
