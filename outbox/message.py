"""The outbox message value type and its validation. No I/O here.

Every check that can be made before the row is written is made here, so that a bad event is
refused while the caller can still roll back, instead of becoming a poison message later.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import numbers
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from .cloudevent import CloudEvent, cloudevent_headers, is_binding_header
from .errors import InvalidMessage, InvalidTopic, MessageTooLarge

#: The largest record, counted as the producer counts it (``record_size``). The relay's
#: producer runs with ``message.max.bytes`` equal to the same number (``max_message_bytes``),
#: so what ``publish()`` accepts, the relay can hand to Kafka. A topic needs
#: ``max.message.bytes`` of at least this plus ``RECORD_BATCH_OVERHEAD`` (Kafka's default,
#: 1,048,588, is enough); ``outbox doctor`` checks it.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000

#: librdkafka's upper bound of a v2 record's own framing (RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD:
#: length, attributes, timestamp and offset deltas, key and value lengths, header count).
RECORD_OVERHEAD = 5 + 1 + 10 + 5 + 5 + 5 + 5
#: The record batch header around one or more records (RD_KAFKAP_MSGSET_V2_SIZE).
RECORD_BATCH_OVERHEAD = 61
#: The header the relay adds to every record: its name and a UUID as text.
MESSAGE_ID_HEADER = "message_id"

_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_TENANT_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}")

Payload: TypeAlias = Mapping[str, Any] | list | str | bytes | bytearray | memoryview
HeaderValue: TypeAlias = str | bytes | None
Headers: TypeAlias = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]]

#: The header the relay adds to the record of a row with a tenant: its name. A key is a
#: sequence per tenant, and two tenants may use the same key in one topic: consumers tell
#: them apart by it.
TENANT_HEADER = "outbox_tenant"
#: Header names the relay sets itself; an application may not set them.
RESERVED_HEADERS = frozenset({"message_id", TENANT_HEADER})


@dataclass(frozen=True)
class OutboxMessage:
    """One event, validated and encoded exactly as it will be stored and sent."""

    message_id: uuid.UUID
    topic: str
    key: bytes | None
    payload: bytes
    headers: list[tuple[str, bytes | None]]
    dedup_key: str | None = None
    #: '' when the event has no tenant (schema.sql).
    tenant: str = ""
    #: Scheduled delivery: not sent before this time (time-zone aware) ...
    deliver_at: dt.datetime | None = None
    #: ... or not before this many seconds after the INSERT (its statement_timestamp()), by
    #: the database's clock (the one the promoter compares with). At most one of the two is set.
    delay: float | None = None

    def headers_json(self) -> str | None:
        """The headers column: a JSON array of [name, value] pairs (see schema.sql)."""
        if not self.headers:
            return None
        return json.dumps([[name, _header_value_to_json(value)] for name, value in self.headers])


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): new ids land at the right edge of the
    message_id index instead of at random pages."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def validate_topic(topic: object) -> str:
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be a str, not {type(topic).__name__}")
    if not _TOPIC_RE.fullmatch(topic) or topic in (".", ".."):
        shown = topic if len(topic) <= 60 else topic[:57] + "..."
        raise InvalidTopic(
            f"invalid topic name {shown!r}: Kafka allows 1 to 249 characters of "
            "[a-zA-Z0-9._-], and not '.' or '..'"
        )
    return topic


def validate_tenant(tenant: object) -> str:
    """A tenant name as stored: None is no tenant (''); else 1 to 64 of [a-zA-Z0-9._-], the
    characters of a topic name (so that a tenant can name its own topics and metric labels),
    starting with a letter or digit ('-' stands for "no tenant" where an operator types one)."""
    if tenant is None:
        return ""
    if not isinstance(tenant, str):
        raise TypeError(f"tenant must be a str or None, not {type(tenant).__name__}")
    if not _TENANT_RE.fullmatch(tenant):
        shown = tenant if len(tenant) <= 70 else tenant[:67] + "..."
        raise InvalidMessage(
            f"invalid tenant {shown!r}: use 1 to 64 characters of [a-zA-Z0-9._-] starting "
            "with a letter or digit, or None for no tenant"
        )
    return tenant


#: The longest delay= taken: longer is a unit mistake (milliseconds given as seconds, say).
MAX_DELAY_SECONDS = 100 * 366 * 86400.0


def validate_schedule(deliver_at: object, delay: object) -> tuple[dt.datetime | None, float | None]:
    """(deliver_at, delay in seconds) as stored; (None, None) when not scheduled. A naive
    deliver_at is refused: whose 10:00 it means is not for the writer to guess."""
    if deliver_at is not None and delay is not None:
        raise InvalidMessage("give deliver_at= or delay=, not both")
    if deliver_at is not None:
        if not isinstance(deliver_at, dt.datetime):
            raise TypeError(
                f"deliver_at must be a datetime.datetime, not {type(deliver_at).__name__}"
            )
        if deliver_at.utcoffset() is None:
            raise InvalidMessage(
                f"deliver_at {deliver_at.isoformat()} has no time zone: give an aware "
                "datetime, e.g. datetime.now(timezone.utc) + timedelta(hours=1)"
            )
        # Within a century of now, as a delay is: a year 1 or 9999 (a unit or parsing mistake)
        # would reach the database and fail there, after the key locks were taken.
        now = dt.datetime.now(dt.timezone.utc)
        century = dt.timedelta(seconds=MAX_DELAY_SECONDS)
        if not (deliver_at.year > 1 and deliver_at.year < 9999) or not (
            now - century <= deliver_at <= now + century
        ):
            raise InvalidMessage(
                f"deliver_at {deliver_at.isoformat()} is more than 100 years from now"
            )
        return deliver_at, None
    if delay is None:
        return None, None
    if isinstance(delay, dt.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, numbers.Real) and not isinstance(delay, bool):
        seconds = float(delay)
    else:
        raise TypeError(
            f"delay must be a datetime.timedelta or a number of seconds, not {type(delay).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_DELAY_SECONDS:
        raise InvalidMessage(
            f"delay must be a finite number of seconds from 0 to {MAX_DELAY_SECONDS:.0f} "
            f"(100 years), not {delay!r}"
        )
    return None, seconds


def encode_payload(payload: object) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return _utf8(payload, "payload")
    if isinstance(payload, (dict, list)) or isinstance(payload, Mapping):
        try:
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidMessage(f"payload cannot be encoded as JSON: {exc}") from exc
        return _utf8(text, "payload")
    raise TypeError(f"payload must be a dict, list, str or bytes, not {type(payload).__name__}")


def encode_key(key: object) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    if isinstance(key, str):
        return _utf8(key, "key")
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode()
    raise TypeError(f"key must be a str, bytes, int or None, not {type(key).__name__}")


def encode_headers(headers: Headers | None) -> list[tuple[str, bytes | None]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        items = list(headers.items())
    elif isinstance(headers, (str, bytes)):
        raise TypeError("headers must be a mapping or a list of (name, value) pairs")
    else:
        items = list(headers)
    out: list[tuple[str, bytes | None]] = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"each header must be a (name, value) pair, not {item!r:.60}")
        name, value = item
        if not isinstance(name, str):
            raise TypeError(f"header name must be a str, not {type(name).__name__}")
        if not name:
            raise InvalidMessage("header name must not be empty")
        if name in RESERVED_HEADERS:
            raise InvalidMessage(f"header {name!r} is set by the relay and cannot be given")
        if value is None:
            out.append((name, None))
        elif isinstance(value, str):
            out.append((name, _utf8(value, f"header {name!r}")))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out.append((name, bytes(value)))
        else:
            raise TypeError(
                f"header {name!r} value must be a str, bytes or None, not {type(value).__name__}"
            )
    return out


def build_message(
    *,
    topic: str,
    payload: Payload,
    key: str | bytes | int | None = None,
    headers: Headers | None = None,
    dedup_key: str | None = None,
    tenant: str | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    message_id: uuid.UUID | None = None,
    cloudevent: CloudEvent | Mapping[str, Any] | None = None,
    deliver_at: dt.datetime | None = None,
    delay: dt.timedelta | float | None = None,
) -> OutboxMessage:
    """Validate and encode one event; raise before anything is written.

    ``cloudevent``: the event's CloudEvents attributes (outbox.CloudEvent, or a mapping of its
    fields); the binding's binary-mode headers are then added to HEADERS (outbox/cloudevent.py).

    ``deliver_at`` (aware) or ``delay`` (a timedelta or seconds): scheduled delivery
    (validate_schedule; docs/writing-events.md).
    """
    topic = validate_topic(topic)
    tenant_name = validate_tenant(tenant)
    due_at, delay_seconds = validate_schedule(deliver_at, delay)
    body = encode_payload(payload)
    key_bytes = encode_key(key)
    header_list = encode_headers(headers)
    event = None if cloudevent is None else CloudEvent.coerce(cloudevent)
    if event is not None:
        clash = next((name for name, _ in header_list if is_binding_header(name)), None)
        if clash is not None:
            raise InvalidMessage(
                f"header {clash!r} cannot be given with cloudevent=: the CloudEvents binding "
                "sets the ce_ headers and content-type itself"
            )
    if dedup_key is not None:
        if not isinstance(dedup_key, str):
            raise TypeError(f"dedup_key must be a str, not {type(dedup_key).__name__}")
        if not dedup_key or "\x00" in dedup_key:
            raise InvalidMessage("dedup_key must be a non-empty str without NUL characters")
    mid = message_id or uuid7()
    if event is not None:
        header_list += encode_headers(cloudevent_headers(event, message_id=mid, payload=payload))
    size = record_size(key_bytes, body, header_list, tenant_name)
    if size > max_bytes:
        raise MessageTooLarge(
            f"message to topic {topic!r} is {size} bytes as a Kafka record (payload, key, "
            f"headers and framing), above the maximum of {max_bytes} bytes"
        )
    return OutboxMessage(
        mid, topic, key_bytes, body, header_list, dedup_key, tenant_name, due_at, delay_seconds
    )


def _varint_size(n: int) -> int:
    """Bytes of N as a zigzag varint, as Kafka's record format writes lengths."""
    z = (n << 1) ^ (n >> 63)
    size = 1
    while z >= 0x80:
        z >>= 7
        size += 1
    return size


def _header_size(name: bytes, value: bytes | None) -> int:
    value_len = 0 if value is None else len(value)
    return len(name) + _varint_size(len(name)) + value_len + _varint_size(value_len)


#: The message_id header's share of every record (a UUID as text is 36 bytes).
_MESSAGE_ID_SIZE = _header_size(MESSAGE_ID_HEADER.encode(), b"0" * 36)


def record_size(
    key: bytes | None,
    payload: bytes,
    headers: Iterable[tuple[str, bytes | None]] = (),
    tenant: str = "",
) -> int:
    """A message's size as librdkafka checks it against ``message.max.bytes`` at produce time:
    the record framing bound, key, payload and serialised headers, the relay's message_id
    header (and tenant header, for a row with a tenant) included. The writer refuses above its
    limit by this count, so the relay's producer (configured with the same limit) never refuses
    a stored row for its size."""
    size = RECORD_OVERHEAD + len(key or b"") + len(payload) + _MESSAGE_ID_SIZE
    if tenant:
        size += _header_size(TENANT_HEADER.encode(), tenant.encode())
    for name, value in headers:
        size += _header_size(name.encode("utf-8") if isinstance(name, str) else name, value)
    return size


def headers_from_json(raw: Any) -> list[tuple[str, bytes | None]]:
    """Decode the headers column back into Kafka headers (the relay's side of headers_json)."""
    if not raw:
        return []
    if isinstance(raw, (str, bytes)):
        raw = json.loads(raw)
    return [(name, _header_value_from_json(value)) for name, value in raw]


def _header_value_to_json(value: bytes | None) -> Any:
    if value is None:
        return None
    if b"\x00" not in value:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    # jsonb cannot hold NUL or invalid UTF-8: keep such bytes exactly, base64-encoded.
    return {"base64": base64.b64encode(value).decode("ascii")}


def _header_value_from_json(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    return base64.b64decode(value["base64"])


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessage(f"{what} is not valid Unicode text: {exc}") from exc
