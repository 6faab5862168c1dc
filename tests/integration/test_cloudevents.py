"""publish(cloudevent=...) against the real pair: the relay's records, read from Kafka, are read
back by the official CloudEvents SDK as the events published; a bad cloudevent writes nothing.
"""

from datetime import datetime, timezone

import psycopg
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1 import kafka as legacy_kafka

import outbox
from outbox import CloudEvent
from tests.integration.test_relay_kafka import drain
from tests.kafka_helpers import Received, read_all


def sdk_event(record: Received):
    headers = {name: value for name, value in record.headers if value is not None}
    return from_binary(KafkaMessage(headers, record.key, record.value), JSONFormat())


def stored_time(dsn: str, row_id: int) -> datetime:
    """The ce_time header as stored in the row at write time."""
    with psycopg.connect(dsn) as c:
        (stamp,) = c.execute(
            "SELECT h->>1 FROM local_message, jsonb_array_elements(headers) h "
            "WHERE id = %s AND h->>0 = 'ce_time'",
            (row_id,),
        ).fetchone()
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_the_official_sdk_reads_the_records_as_the_published_events(conn, dsn, bootstrap, topic):
    published = [
        # (publish() arguments, what the SDK must read: data, datacontenttype)
        (
            dict(
                key="account-1",
                payload={"amount": 10, "currency": "€"},
                cloudevent=CloudEvent(
                    type="com.example.account.debited",
                    source="https://bank.example/accounts",
                    subject="account-1",
                    dataschema="https://bank.example/schemas/debited.json",
                ),
            ),
            {"amount": 10, "currency": "€"},
            "application/json",
        ),
        (
            dict(
                key="note-1",
                payload="plain text, é",
                cloudevent={"type": "com.example.note", "source": "/notes", "subject": "n-1"},
            ),
            "plain text, é",
            "text/plain; charset=utf-8",
        ),
        (
            dict(
                key=None,
                payload=b"\x08\x96\x01\xff",
                headers={"app-header": "kept"},
                cloudevent=CloudEvent(
                    type="com.example.blob",
                    source="/blobs",
                    subject="b-1",
                    datacontenttype="application/x-protobuf",
                ),
            ),
            b"\x08\x96\x01\xff",
            "application/x-protobuf",
        ),
        (
            dict(
                key="raw-1",
                payload=b"\x00\xfe",
                cloudevent=CloudEvent(type="com.example.raw", source="/raw", subject="r-1"),
            ),
            b"\x00\xfe",
            "application/octet-stream",
        ),
    ]
    before = datetime.now(timezone.utc)
    with conn.transaction():
        results = [outbox.publish(conn, topic=topic, **kwargs) for kwargs, _, _ in published]
        # publish_many takes it as a mapping key of its items
        (many,) = outbox.publish_many(
            conn,
            [
                {
                    "topic": topic,
                    "key": "list-1",
                    "payload": [1, "two"],
                    "cloudevent": {"type": "com.example.list", "source": "/lists", "subject": "l"},
                }
            ],
        )
    after = datetime.now(timezone.utc)
    results.append(many)
    published.append(
        (
            dict(
                key="list-1",
                cloudevent=CloudEvent(type="com.example.list", source="/lists", subject="l"),
            ),
            [1, "two"],
            "application/json",
        )
    )
    drain(dsn, bootstrap)

    records = read_all(bootstrap, topic, expected=len(published))
    assert len(records) == len(published)
    by_id = {r.header("message_id").decode(): r for r in records}
    for (kwargs, data, content_type), result in zip(published, results, strict=True):
        record = by_id[str(result.message_id)]
        event = sdk_event(record)
        ce = CloudEvent.coerce(kwargs["cloudevent"])
        assert event.get_id() == str(result.message_id)
        assert event.get_specversion() == "1.0"
        assert event.get_type() == ce.type
        assert event.get_source() == ce.source
        assert event.get_subject() == ce.subject
        assert event.get_dataschema() == ce.dataschema
        assert event.get_datacontenttype() == content_type
        assert event.get_data() == data
        assert before <= event.get_time() <= after
        assert event.get_time() == stored_time(dsn, result.id)
        # the Kafka key stays the key given (the SDK shows it as the partitionkey extension)
        key = kwargs.get("key")
        assert record.key == (None if key is None else key.encode())
        assert event.get_extension("partitionkey") == key
        # the SDK's older v1 API reads the same attributes (it leaves data to the caller)
        legacy = legacy_kafka.from_binary(
            legacy_kafka.KafkaMessage(dict(record.headers), record.key, record.value),
            data_unmarshaller=lambda value: value,
        )
        assert (legacy["id"], legacy["type"], legacy["source"]) == (
            str(result.message_id),
            ce.type,
            ce.source,
        )
        assert legacy.data == record.value
    # the application's own headers travel next to the binding's
    blob = by_id[str(results[2].message_id)]
    assert blob.header("app-header") == b"kept"


def rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT id, message_id, topic FROM local_message ORDER BY id").fetchall()


@pytest.mark.parametrize(
    "cloudevent, error",
    [
        ({"type": 42, "source": "/s"}, TypeError),
        ({"type": "", "source": "/s"}, outbox.InvalidMessage),
        ({"type": "x", "source": "not a uri"}, outbox.InvalidMessage),
    ],
)
def test_a_bad_cloudevent_writes_nothing_and_the_transaction_goes_on(conn, dsn, cloudevent, error):
    with conn.transaction():
        good = outbox.publish(
            conn, topic="t", payload={}, cloudevent=CloudEvent(type="x", source="/s")
        )
        with pytest.raises(error, match="cloudevent"):
            outbox.publish(conn, topic="t", payload={"bad": True}, cloudevent=cloudevent)
        with pytest.raises(error, match="message #1: cloudevent"):
            outbox.publish_many(
                conn,
                [
                    {"topic": "t", "payload": {"n": 1}},
                    {"topic": "t", "payload": {"n": 2}, "cloudevent": cloudevent},
                ],
            )
        with pytest.raises(outbox.InvalidMessage, match="'ce_type' cannot be given"):
            outbox.publish(
                conn,
                topic="t",
                payload={},
                headers={"ce_type": "mine"},
                cloudevent=CloudEvent(type="x", source="/s"),
            )
    assert rows(dsn) == [(good.id, good.message_id, "t")]


async def test_apublish_takes_a_cloudevent(dsn):
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        async with aconn.transaction():
            p = await outbox.apublish(
                aconn, topic="t", payload="hi", cloudevent=CloudEvent(type="x.y", source="/a")
            )
            (q,) = await outbox.apublish_many(
                aconn, [{"topic": "t", "payload": {}, "cloudevent": {"type": "z", "source": "/b"}}]
            )
    with psycopg.connect(dsn) as c:
        stored = dict(
            c.execute(
                "SELECT id, (SELECT jsonb_object_agg(h->>0, h->1) FROM jsonb_array_elements("
                "headers) h) FROM local_message ORDER BY id"
            ).fetchall()
        )
    assert stored[p.id]["ce_id"] == str(p.message_id)
    assert (stored[p.id]["ce_type"], stored[p.id]["content-type"]) == (
        "x.y",
        "text/plain; charset=utf-8",
    )
    assert stored[q.id]["ce_id"] == str(q.message_id)
    assert (stored[q.id]["ce_type"], stored[q.id]["content-type"]) == ("z", "application/json")
