"""Everything of the relay that touches Kafka: the only package of relay/ that imports
confluent_kafka. The modules, one job each:

- client: what an error means for a message, the settings every client shares, a message's
  size as a record;
- sink: KafkaSink, at-least-once delivery;
- transactional: ShardProducer and TransactionalSink, exactly-once delivery;
- admin: the cluster checks and the topic calls;
- records: KafkaRecordSource, the records `outbox reconcile` reads.

The rest of relay/ imports from here (``from .kafka import KafkaSink``), not from the modules.
relay/topics.py does so when it calls the topic functions, so that a test replacing one here
(``monkeypatch.setattr(relay.kafka, "describe_topics", ...)``) replaces it for `outbox topics`.
"""

from .admin import (
    TopicCreation,
    TopicShape,
    check_kafka,
    check_progress_topic,
    check_transactions,
    create_topics,
    describe_topics,
    missing_topics,
    topic_limits,
    wait_for_leaders,
)
from .client import (
    KafkaSettingsError,
    classify,
    client_settings,
    describe,
    message_size,
    new_client,
    report_client_error,
)
from .records import SEEK_GAP, KafkaRecordSource
from .sink import DEFAULT_PRODUCER_CONFIG, REQUIRED_PRODUCER_CONFIG, KafkaSink
from .transactional import (
    TRANSACTIONAL_PRODUCER_CONFIG,
    ShardProducer,
    TransactionalSink,
    transaction_timeout,
)

__all__ = [
    "DEFAULT_PRODUCER_CONFIG",
    "REQUIRED_PRODUCER_CONFIG",
    "SEEK_GAP",
    "TRANSACTIONAL_PRODUCER_CONFIG",
    "KafkaRecordSource",
    "KafkaSettingsError",
    "KafkaSink",
    "ShardProducer",
    "TopicCreation",
    "TopicShape",
    "TransactionalSink",
    "check_kafka",
    "check_progress_topic",
    "check_transactions",
    "classify",
    "client_settings",
    "create_topics",
    "describe",
    "describe_topics",
    "message_size",
    "missing_topics",
    "new_client",
    "report_client_error",
    "topic_limits",
    "transaction_timeout",
    "wait_for_leaders",
]
