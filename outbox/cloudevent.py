"""CloudEvents attributes of an event, written as Kafka headers in the binary content mode.

``publish(..., cloudevent=CloudEvent(type=..., source=...))`` stores, next to the application's
headers, the headers of the CloudEvents Kafka protocol binding's binary content mode: every
context attribute as a ``ce_`` header and ``datacontenttype`` as ``content-type``; the Kafka
value stays the payload, as-is. They are computed when the row is written, so the writer's size
check counts them and the relay sends them like any stored header.

Specifications (v1.0.2):
https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md (attributes, type system)
https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/kafka-protocol-binding.md
(3.2, binary content mode: ``ce_`` prefix, ``content-type``, UTF-8 header values)

Only the binary mode is made; the structured mode (the whole event as JSON in the value) would
change the payload the application gave, which the outbox stores and sends exactly.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone

from .errors import InvalidMessage

SPECVERSION = "1.0"
#: The binding's prefix of attribute headers (kafka-protocol-binding.md 3.2.3.1).
HEADER_PREFIX = "ce_"
#: The header datacontenttype maps to (kafka-protocol-binding.md 3.2.1).
CONTENT_TYPE_HEADER = "content-type"

#: content-type when the event gives no datacontenttype, by what the payload was.
JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
BYTES_CONTENT_TYPE = "application/octet-stream"

# The type system's String: no control characters (U+0000-U+001F, U+007F-U+009F), no
# noncharacters (U+FDD0-U+FDEF and the last two code points of every plane), no lone
# surrogates.
_DISALLOWED = re.compile(
    "[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ud800-\udfff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(17))
    + "]"
)
# URI-reference (RFC 3986 4.1) by its characters: unreserved, reserved and percent-encoded
# octets; its structure is not checked further.
_URI_CHARS = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")
# An absolute URI (RFC 3986 4.3) starts with its scheme.
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# A media type (RFC 2046, its syntax as RFC 9110 8.3.1 spells it): type/subtype, parameters.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;.*)?", re.S)


@dataclass(frozen=True)
class CloudEvent:
    """The CloudEvents attributes an application chooses for an event; ``id`` (the
    message_id), ``specversion`` ("1.0") and ``time`` (the writer's clock) are added at
    write time.

    ``type``: the kind of event, say ``com.example.account.debited`` (non-empty).
    ``source``: where it happened, a URI-reference such as ``/accounts`` or
    ``https://bank.example/accounts`` (non-empty).
    ``subject``: what it is about within the source, say ``account-1`` (optional).
    ``datacontenttype``: the payload's media type; by default ``application/json`` for a dict
    or list payload, ``text/plain; charset=utf-8`` for a str and ``application/octet-stream``
    for bytes.
    ``dataschema``: an absolute URI of the payload's schema (optional).
    """

    type: str
    source: str
    subject: str | None = None
    datacontenttype: str | None = None
    dataschema: str | None = None

    def __post_init__(self) -> None:
        _check_string("type", self.type)
        _check_string("source", self.source)
        if not _URI_CHARS.fullmatch(self.source):
            raise InvalidMessage(
                f"cloudevent source {_shown(self.source)} is not a URI-reference (RFC 3986): "
                "use letters, digits, -._~:/?#[]@!$&'()*+,;= and %XX escapes"
            )
        if self.subject is not None:
            _check_string("subject", self.subject)
        if self.datacontenttype is not None:
            _check_string("datacontenttype", self.datacontenttype)
            if not _MEDIA_TYPE.fullmatch(self.datacontenttype):
                raise InvalidMessage(
                    f"cloudevent datacontenttype {_shown(self.datacontenttype)} is not a media "
                    "type such as 'application/json' or 'text/plain; charset=utf-8'"
                )
        if self.dataschema is not None:
            _check_string("dataschema", self.dataschema)
            if not (_URI_CHARS.fullmatch(self.dataschema) and _URI_SCHEME.match(self.dataschema)):
                raise InvalidMessage(
                    f"cloudevent dataschema {_shown(self.dataschema)} is not an absolute URI "
                    "(RFC 3986) such as 'https://example.com/schemas/debited.json'"
                )

    @classmethod
    def coerce(cls, value: object) -> CloudEvent:
        """VALUE as a CloudEvent: a CloudEvent, or a mapping of its fields."""
        if isinstance(value, CloudEvent):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(str(k) for k in value if k not in known)
            if unknown:
                raise TypeError(
                    f"cloudevent has unknown attribute(s) {', '.join(unknown)}; known: "
                    f"{', '.join(f.name for f in fields(cls))}"
                )
            for required in ("type", "source"):
                if required not in value:
                    raise InvalidMessage(f"cloudevent needs a {required!r}")
            return cls(**value)
        raise TypeError(
            "cloudevent must be an outbox.CloudEvent or a mapping of its attributes, not "
            f"{type(value).__name__}"
        )


def cloudevent_headers(
    event: CloudEvent,
    *,
    message_id: uuid.UUID,
    payload: object,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """The binary-mode headers of EVENT for a message whose message_id is MESSAGE_ID and whose
    payload (as the application gave it, before encoding) is PAYLOAD; ``ce_time`` is NOW
    (default: the clock of this process), in RFC 3339 UTC."""
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    headers = [
        ("ce_specversion", SPECVERSION),
        ("ce_id", str(message_id)),
        ("ce_source", event.source),
        ("ce_type", event.type),
        ("ce_time", when.isoformat(timespec="microseconds").replace("+00:00", "Z")),
    ]
    if event.subject is not None:
        headers.append(("ce_subject", event.subject))
    if event.dataschema is not None:
        headers.append(("ce_dataschema", event.dataschema))
    headers.append((CONTENT_TYPE_HEADER, event.datacontenttype or default_content_type(payload)))
    return headers


def default_content_type(payload: object) -> str:
    """The media type of a payload as the writer encodes it (message.encode_payload)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return BYTES_CONTENT_TYPE
    if isinstance(payload, str):
        return TEXT_CONTENT_TYPE
    return JSON_CONTENT_TYPE


def is_binding_header(name: str) -> bool:
    """Whether a header NAME is one the binary mode sets (receivers match names
    case-insensitively)."""
    lowered = name.lower()
    return lowered.startswith(HEADER_PREFIX) or lowered == CONTENT_TYPE_HEADER


def _check_string(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"cloudevent {name} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidMessage(f"cloudevent {name} must not be empty")
    bad = _DISALLOWED.search(value)
    if bad:
        raise InvalidMessage(
            f"cloudevent {name} {_shown(value)} holds U+{ord(bad.group()):04X}, which a "
            "CloudEvents String may not hold (control characters, noncharacters, surrogates)"
        )


def _shown(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")
