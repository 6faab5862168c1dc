import json
import logging
import uuid

import pytest

from outbox import InvalidMessage, InvalidTopic, MessageTooLarge, build_message
from outbox.message import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RECORD_BATCH_OVERHEAD,
    headers_from_json,
    record_size,
    uuid7,
)


def test_dict_payload_is_compact_utf8_json():
    m = build_message(topic="payments", payload={"amount": 10, "currency": "€"})
    assert m.payload == '{"amount":10,"currency":"€"}'.encode()
    assert json.loads(m.payload) == {"amount": 10, "currency": "€"}


@pytest.mark.parametrize(
    "payload, stored",
    [
        ([1, 2], b"[1,2]"),
        ("text", b"text"),
        (b"\x00\xffraw", b"\x00\xffraw"),
        (bytearray(b"ba"), b"ba"),
        (memoryview(b"mv"), b"mv"),
    ],
)
def test_accepted_payload_types_are_stored_exactly(payload, stored):
    assert build_message(topic="t", payload=payload).payload == stored


@pytest.mark.parametrize("payload", [42, 1.5, None, object(), {1, 2}])
def test_other_payload_types_raise_type_error_naming_the_type(payload):
    with pytest.raises(TypeError, match=type(payload).__name__):
        build_message(topic="t", payload=payload)


def test_values_json_cannot_encode_are_refused():
    with pytest.raises(InvalidMessage, match="JSON"):
        build_message(topic="t", payload={"when": object()})
    with pytest.raises(InvalidMessage, match="JSON"):
        build_message(topic="t", payload={"x": float("nan")})


@pytest.mark.parametrize(
    "topic", ["", ".", "..", "has space", "a" * 250, "semi;colon", "drop table x;--", "ü"]
)
def test_invalid_topic_names_are_refused(topic):
    with pytest.raises(InvalidTopic):
        build_message(topic=topic, payload={})


@pytest.mark.parametrize("topic", ["a", "A.b_c-9", "a" * 249, "..."])
def test_valid_topic_names_pass(topic):
    assert build_message(topic=topic, payload={}).topic == topic


def test_non_str_topic_is_refused():
    with pytest.raises(InvalidTopic, match="int"):
        build_message(topic=5, payload={})


def test_size_limit_counts_the_record_as_kafka_does():
    base = record_size(None, b"x" * 900)
    build_message(topic="t", payload=b"x" * 900, max_bytes=base)
    with pytest.raises(MessageTooLarge, match=f"above the maximum of {base} bytes"):
        build_message(topic="t", payload=b"x" * 901, max_bytes=base)
    with pytest.raises(MessageTooLarge):
        build_message(topic="t", payload=b"x" * 900, key=b"k", max_bytes=base)
    with pytest.raises(MessageTooLarge):
        build_message(topic="t", payload=b"x" * 900, headers={"h": b""}, max_bytes=base)


@pytest.mark.parametrize(
    "key, headers",
    [
        (None, []),
        (b"account-1", [("event-type", b"AccountDebited")]),
        (b"k" * 300, [(f"h{i}", b"v" * (i * 40)) for i in range(12)] + [("none", None)]),
    ],
)
def test_record_size_is_what_librdkafka_checks_at_produce_time(key, headers):
    """The writer's limit and the producer's message.max.bytes are one number: a record of
    exactly the limit is taken by a producer configured with it, one byte more is refused."""
    from confluent_kafka import KafkaError, KafkaException, Producer

    limit = 5000
    payload = b"p" * (limit - record_size(key, b"", headers))
    assert record_size(key, payload, headers) == limit
    producer = Producer(
        {"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": limit},
        logger=logging.getLogger("unreachable"),
    )
    all_headers = [("message_id", str(uuid7()).encode()), *headers]
    producer.produce("t", value=payload, key=key, headers=all_headers)  # accepted
    with pytest.raises(KafkaException) as refused:
        producer.produce("t", value=payload + b"p", key=key, headers=all_headers)
    assert refused.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    producer.purge()


def test_default_limit_fits_kafkas_default_topic_limit():
    assert DEFAULT_MAX_MESSAGE_BYTES + RECORD_BATCH_OVERHEAD <= 1_048_588
    build_message(topic="t", payload=b"x" * 999_000)
    with pytest.raises(MessageTooLarge):
        build_message(topic="t", payload=b"x" * 1_000_000)


@pytest.mark.parametrize(
    "headers, error",
    [
        ({1: "v"}, TypeError),
        ({"h": 5}, TypeError),
        ([("h",)], TypeError),
        ("h=v", TypeError),
        ({"": "v"}, InvalidMessage),
        ({"message_id": "x"}, InvalidMessage),
    ],
)
def test_bad_headers_are_refused(headers, error):
    with pytest.raises(error):
        build_message(topic="t", payload={}, headers=headers)


def test_headers_round_trip_through_the_column_encoding_exactly():
    given = [("text", "héllo"), ("raw", b"\x00\xff\xfe"), ("none", None), ("text", "again")]
    m = build_message(topic="t", payload={}, headers=given)
    decoded = headers_from_json(m.headers_json())
    assert decoded == [
        ("text", "héllo".encode()),
        ("raw", b"\x00\xff\xfe"),
        ("none", None),
        ("text", b"again"),
    ]


def test_keys_accept_str_bytes_int_and_none():
    assert build_message(topic="t", payload={}, key="k").key == b"k"
    assert build_message(topic="t", payload={}, key=b"\x00k").key == b"\x00k"
    assert build_message(topic="t", payload={}, key=42).key == b"42"
    assert build_message(topic="t", payload={}).key is None
    with pytest.raises(TypeError, match="float"):
        build_message(topic="t", payload={}, key=1.5)


def test_lone_surrogates_are_refused_as_invalid_text():
    with pytest.raises(InvalidMessage, match="not valid Unicode"):
        build_message(topic="t", payload="bad \ud800 text")


def test_uuid7_is_time_ordered_and_version_7():
    ids = [uuid7() for _ in range(1000)]
    assert all(u.version == 7 for u in ids)
    assert [u.bytes[:6] for u in ids] == sorted(u.bytes[:6] for u in ids)
    assert len(set(ids)) == 1000
    assert isinstance(ids[0], uuid.UUID)


@pytest.mark.parametrize("key", [None, b"", b"k", b"k" * 200])
@pytest.mark.parametrize("payload", [b"", b"p", b"p" * 127, b"p" * 128, b"p" * 20_000])
def test_the_relays_shortcut_size_equals_record_size(key, payload):
    import datetime as dt

    from relay.kafka import message_size
    from relay.model import PendingMessage

    message = PendingMessage(
        1, "0" * 36, "t", key, payload, [], 0, dt.datetime.now(dt.timezone.utc)
    )
    assert message_size(message) == record_size(key, payload)
    with_header = message._replace(headers=[("h", b"v")])
    assert message_size(with_header) == record_size(key, payload, [("h", b"v")])


def test_a_tenant_counts_as_the_header_the_relay_adds_to_its_record():
    """A row with a tenant is sent with an outbox_tenant header: the writer's limit counts
    it, librdkafka takes a record of exactly the limit, and the relay measures it the same."""
    import datetime as dt

    from confluent_kafka import KafkaError, KafkaException, Producer

    from relay.kafka import message_size
    from relay.model import PendingMessage

    limit = 3000
    payload = b"p" * (limit - record_size(b"k", b"", tenant="acme"))
    assert record_size(b"k", payload) < record_size(b"k", payload, tenant="acme") == limit
    build_message(topic="t", payload=payload, key=b"k", tenant="acme", max_bytes=limit)
    with pytest.raises(MessageTooLarge):
        build_message(topic="t", payload=payload + b"p", key=b"k", tenant="acme", max_bytes=limit)
    pending = PendingMessage(
        1, "0" * 36, "t", b"k", payload, [], 0, dt.datetime.now(dt.timezone.utc), 0, "acme"
    )
    assert message_size(pending) == limit
    producer = Producer(
        {"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": limit},
        logger=logging.getLogger("unreachable"),
    )
    headers = [("message_id", str(uuid7()).encode()), ("outbox_tenant", b"acme")]
    producer.produce("t", value=payload, key=b"k", headers=headers)  # accepted
    with pytest.raises(KafkaException) as refused:
        producer.produce("t", value=payload + b"p", key=b"k", headers=headers)
    assert refused.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    producer.purge()
