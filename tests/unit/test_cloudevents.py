"""publish(cloudevent=...): the CloudEvents Kafka binding's binary-mode headers, made at write
time, their validation, and their share of the record size. The official SDK reads the
records built here (tests/integration/test_cloudevents.py reads them from Kafka)."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat

import outbox
from outbox import CloudEvent, InvalidMessage, MessageTooLarge, build_message
from outbox.message import record_size
from outbox.writer import build_all

EVENT = CloudEvent(type="com.example.account.debited", source="/accounts")


def headers(message) -> dict[str, bytes]:
    assert len({name for name, _ in message.headers}) == len(message.headers), "a name twice"
    return dict(message.headers)


def sdk_event(message):
    """The official SDK's reading of the record the relay will send for MESSAGE."""
    kafka_headers = {**headers(message), "message_id": str(message.message_id).encode()}
    return from_binary(KafkaMessage(kafka_headers, message.key, message.payload), JSONFormat())


def test_the_binary_mode_headers_of_a_json_payload():
    before = datetime.now(timezone.utc)
    m = build_message(
        topic="accounts",
        key="account-1",
        payload={"amount": 10},
        headers={"app": "x"},
        cloudevent=CloudEvent(
            type="com.example.account.debited",
            source="https://bank.example/accounts",
            subject="account-1",
            dataschema="https://bank.example/schemas/debited.json",
        ),
    )
    after = datetime.now(timezone.utc)
    h = headers(m)
    assert h.pop("app") == b"x"
    when = datetime.fromisoformat(h.pop("ce_time").decode().replace("Z", "+00:00"))
    assert before <= when <= after and when.utcoffset() == timedelta(0)
    assert h == {
        "ce_specversion": b"1.0",
        "ce_id": str(m.message_id).encode(),
        "ce_source": b"https://bank.example/accounts",
        "ce_type": b"com.example.account.debited",
        "ce_subject": b"account-1",
        "ce_dataschema": b"https://bank.example/schemas/debited.json",
        "content-type": b"application/json",
    }
    assert m.payload == b'{"amount":10}'  # the value is the payload, as without cloudevent


def test_ce_time_is_rfc3339_utc_with_a_z():
    m = build_message(topic="t", payload={}, cloudevent=EVENT)
    stamp = headers(m)["ce_time"].decode()
    assert stamp.endswith("Z") and "T" in stamp and "+" not in stamp


@pytest.mark.parametrize(
    "payload, content_type",
    [
        ({"a": 1}, b"application/json"),
        ([1, 2], b"application/json"),
        ("hello", b"text/plain; charset=utf-8"),
        (b"\x00\xff", b"application/octet-stream"),
        (bytearray(b"\x01"), b"application/octet-stream"),
    ],
)
def test_content_type_follows_the_payload_unless_given(payload, content_type):
    assert (
        headers(build_message(topic="t", payload=payload, cloudevent=EVENT))["content-type"]
        == content_type
    )
    given = CloudEvent(type="x", source="/s", datacontenttype="application/vnd.example+json")
    assert (
        headers(build_message(topic="t", payload=payload, cloudevent=given))["content-type"]
        == b"application/vnd.example+json"
    )


def test_no_subject_or_dataschema_header_unless_given():
    h = headers(build_message(topic="t", payload={}, cloudevent=EVENT))
    assert "ce_subject" not in h and "ce_dataschema" not in h


def test_without_cloudevent_nothing_is_added():
    assert build_message(topic="t", payload={"a": 1}).headers == []


def test_a_mapping_works_like_the_dataclass():
    m = build_message(
        topic="t", payload={}, cloudevent={"type": "x.y", "source": "/s", "subject": "a"}
    )
    h = headers(m)
    assert (h["ce_type"], h["ce_source"], h["ce_subject"]) == (b"x.y", b"/s", b"a")


def test_the_given_message_id_is_the_ce_id():
    mid = uuid.uuid4()
    m = build_message(topic="t", payload={}, cloudevent=EVENT, message_id=mid)
    assert headers(m)["ce_id"] == str(mid).encode()


def test_non_ascii_text_is_allowed_and_sent_as_utf8():
    m = build_message(
        topic="t", payload="€", cloudevent=CloudEvent(type="bank.débit", source="/s", subject="é")
    )
    assert headers(m)["ce_type"] == "bank.débit".encode()
    assert headers(m)["ce_subject"] == "é".encode()


@pytest.mark.parametrize(
    "payload, data, content_type",
    [
        ({"amount": 10, "currency": "€"}, {"amount": 10, "currency": "€"}, "application/json"),
        ([1, "two"], [1, "two"], "application/json"),
        ("plain text", "plain text", "text/plain; charset=utf-8"),
        (b"\x00\xfe\xff", b"\x00\xfe\xff", "application/octet-stream"),
    ],
)
def test_the_official_sdk_reads_the_record_as_the_event(payload, data, content_type):
    m = build_message(
        topic="t",
        key="k-1",
        payload=payload,
        cloudevent=CloudEvent(type="com.example.t", source="/src", subject="k-1"),
    )
    event = sdk_event(m)
    assert event.get_id() == str(m.message_id)
    assert event.get_specversion() == "1.0"
    assert (event.get_type(), event.get_source(), event.get_subject()) == (
        "com.example.t",
        "/src",
        "k-1",
    )
    assert event.get_datacontenttype() == content_type
    assert event.get_data() == data
    assert event.get_time() is not None and event.get_time().tzinfo is not None
    # the relay's message_id header has no ce_ prefix: not an attribute of the event
    assert "message_id" not in event.get_attributes()


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"type": 5, "source": "/s"}, TypeError, "cloudevent type must be a str, not int"),
        ({"type": None, "source": "/s"}, TypeError, "cloudevent type must be a str"),
        ({"type": b"x", "source": "/s"}, TypeError, "cloudevent type must be a str, not bytes"),
        ({"type": "", "source": "/s"}, InvalidMessage, "cloudevent type must not be empty"),
        ({"type": "x", "source": 1}, TypeError, "cloudevent source must be a str"),
        ({"type": "x", "source": ""}, InvalidMessage, "cloudevent source must not be empty"),
        ({"type": "x", "source": "/a b"}, InvalidMessage, "not a URI-reference"),
        ({"type": "x", "source": "/ü"}, InvalidMessage, "not a URI-reference"),
        ({"type": "x", "source": "/%zz"}, InvalidMessage, "not a URI-reference"),
        ({"type": "x\n", "source": "/s"}, InvalidMessage, r"U\+000A"),
        ({"type": "x\x85", "source": "/s"}, InvalidMessage, r"U\+0085"),
        ({"type": "x\ufffe", "source": "/s"}, InvalidMessage, r"U\+FFFE"),
        ({"type": "x\ud800", "source": "/s"}, InvalidMessage, r"U\+D800"),
        ({"type": "x", "source": "/s", "subject": 1}, TypeError, "subject must be a str"),
        ({"type": "x", "source": "/s", "subject": ""}, InvalidMessage, "subject must not be"),
        ({"type": "x", "source": "/s", "subject": "a\x00"}, InvalidMessage, r"U\+0000"),
        (
            {"type": "x", "source": "/s", "datacontenttype": 1},
            TypeError,
            "datacontenttype must be a str",
        ),
        (
            {"type": "x", "source": "/s", "datacontenttype": "json"},
            InvalidMessage,
            "not a media type",
        ),
        ({"type": "x", "source": "/s", "dataschema": "/rel"}, InvalidMessage, "absolute URI"),
        ({"type": "x", "source": "/s", "dataschema": 3}, TypeError, "dataschema must be a str"),
    ],
)
def test_bad_attributes_are_refused_with_one_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        CloudEvent(**kwargs)
    # the same error when the attributes come as a mapping, at write time
    with pytest.raises(error, match=match):
        build_message(topic="t", payload={}, cloudevent=kwargs)


@pytest.mark.parametrize(
    "source", ["/accounts", "https://bank.example/a?x=1#f", "urn:uuid:6e8b", "a%20b", "1-555"]
)
def test_uri_references_are_accepted(source):
    assert CloudEvent(type="x", source=source).source == source


@pytest.mark.parametrize(
    "value, error, match",
    [
        ({"type": "x"}, InvalidMessage, "needs a 'source'"),
        ({"source": "/s"}, InvalidMessage, "needs a 'type'"),
        ({"type": "x", "source": "/s", "id": "1"}, TypeError, "unknown attribute.*id"),
        ({"type": "x", "source": "/s", "time": "now"}, TypeError, "unknown attribute.*time"),
        ("com.example", TypeError, "must be an outbox.CloudEvent or a mapping"),
        (42, TypeError, "not int"),
    ],
)
def test_bad_cloudevent_values_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        build_message(topic="t", payload={}, cloudevent=value)


@pytest.mark.parametrize("name", ["ce_type", "ce_id", "ce_myext", "CE_Source", "content-type"])
def test_binding_headers_given_with_cloudevent_conflict(name):
    with pytest.raises(InvalidMessage, match=f"header '{name}' cannot be given with cloudevent="):
        build_message(topic="t", payload={}, headers={name: "v"}, cloudevent=EVENT)
    # without cloudevent= they are ordinary headers, as before
    assert build_message(topic="t", payload={}, headers={name: "v"}).headers == [(name, b"v")]


def test_publish_many_names_the_bad_item():
    with pytest.raises(TypeError, match=r"message #1: cloudevent type must be a str"):
        build_all(
            [
                {"topic": "t", "payload": {}, "cloudevent": EVENT},
                {"topic": "t", "payload": {}, "cloudevent": {"type": 1, "source": "/s"}},
            ],
            outbox.DEFAULT_MAX_MESSAGE_BYTES,
        )


# --------------------------------------------------------------------------- size


def test_the_headers_count_in_the_record_size_exactly():
    m = build_message(topic="t", key="k", payload={"a": 1}, cloudevent=EVENT)
    size = record_size(m.key, m.payload, m.headers)
    assert size > record_size(m.key, m.payload)
    # the limit is checked on this count: exactly at it passes, one byte less is refused
    build_message(topic="t", key="k", payload={"a": 1}, cloudevent=EVENT, max_bytes=size)
    with pytest.raises(MessageTooLarge):
        build_message(topic="t", key="k", payload={"a": 1}, cloudevent=EVENT, max_bytes=size - 1)


def test_a_message_just_under_the_limit_is_refused_with_cloudevent():
    limit = 10_000
    overhead = record_size(None, b"")
    payload = "x" * (limit - overhead)  # exactly at the limit without cloudevent
    assert record_size(None, payload.encode()) == limit
    build_message(topic="t", payload=payload, max_bytes=limit)
    with pytest.raises(MessageTooLarge, match="above the maximum of 10000 bytes"):
        build_message(topic="t", payload=payload, max_bytes=limit, cloudevent=EVENT)


def test_cloudevent_is_frozen_and_exported():
    assert outbox.CloudEvent is CloudEvent
    with pytest.raises(AttributeError):
        EVENT.type = "other"  # type: ignore[misc]
