"""Which rows an operator means: the filters shared by `outbox list`, `replay`, `skip`."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from psycopg import sql

from outbox.errors import InvalidMessage
from outbox.message import validate_tenant

from .model import STATUSES

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class SelectionError(ValueError):
    """The selection cannot be understood; the message says which part."""


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '15m', '2h', '7d', '1w' (or a sum like '1d12h')."""
    text = text.strip().lower()
    total, pos = 0.0, 0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise SelectionError(f"not a duration: {text!r} (use e.g. 30m, 2h, 7d)")
    return dt.timedelta(seconds=total)


def parse_time(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """An ISO timestamp (UTC if no zone), or a duration meaning that long ago ('2h')."""
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        return now - parse_duration(text)
    except SelectionError:
        pass
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise SelectionError(
            f"not a time: {text!r} (use an ISO time like 2026-11-26T10:00 or an age like 2h)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def key_text(key: bytes | None) -> str:
    """A key as an operator reads and types it: the text if it is printable UTF-8, else 0x-hex
    (what --key-hex takes)."""
    if key is None:
        return "-"
    try:
        text = key.decode("utf-8")
        if text.isprintable():
            return text
    except UnicodeDecodeError:
        pass
    return "0x" + key.hex()


def parse_tenant(text: str | None) -> str | None:
    """--tenant NAME as a selection: '' (or '-') means the rows without a tenant."""
    if text is None:
        return None
    if text in ("", "-"):
        return ""
    try:
        return validate_tenant(text)
    except InvalidMessage as exc:
        raise SelectionError(str(exc)) from None


def parse_ref(text: str) -> int | uuid.UUID:
    """A row id or a message_id."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return uuid.UUID(text)
    except ValueError:
        raise SelectionError(f"not a row id or a message_id: {text!r}") from None


@dataclass
class Selection:
    ids: list[int] = field(default_factory=list)
    message_ids: list[uuid.UUID] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    topic: str | None = None
    key: bytes | None = None
    #: '' selects the rows without a tenant.
    tenant: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    error: str | None = None
    #: SENT rows whose claim (claim_expires_at) has expired: rows some other deliverer
    #: claimed and left (this relay never writes SENT).
    expired_claims: bool = False

    @classmethod
    def from_cli(
        cls,
        refs=(),
        statuses=(),
        topic=None,
        key=None,
        key_hex=None,
        since=None,
        until=None,
        error=None,
        expired_claims=False,
        tenant=None,
    ) -> Selection:
        sel = cls(
            topic=topic or None,
            error=error or None,
            expired_claims=expired_claims,
            tenant=parse_tenant(tenant),
        )
        for ref in refs:
            value = parse_ref(ref)
            if isinstance(value, int):
                sel.ids.append(value)
            else:
                sel.message_ids.append(value)
        for st in statuses:
            if st.upper() not in STATUSES:
                raise SelectionError(f"unknown status {st!r} (one of {', '.join(STATUSES)})")
            sel.statuses.append(st.upper())
        if key is not None and key_hex is not None:
            raise SelectionError("give --key or --key-hex, not both")
        if key is not None:
            sel.key = key.encode()
        elif key_hex is not None:
            try:
                sel.key = bytes.fromhex(key_hex)
            except ValueError:
                raise SelectionError(f"--key-hex is not hexadecimal: {key_hex!r}") from None
        sel.since = parse_time(since) if since else None
        sel.until = parse_time(until) if until else None
        return sel

    def is_empty(self) -> bool:
        return not (
            self.ids
            or self.message_ids
            or self.statuses
            or self.topic
            or self.key
            or self.tenant is not None
            or self.since
            or self.until
            or self.error
            or self.expired_claims
        )

    def where(self) -> tuple[sql.Composable, dict[str, Any]]:
        """A WHERE condition (ANDed filters; ids OR message_ids) and its parameters."""
        parts: list[sql.Composable] = []
        params: dict[str, Any] = {}
        if self.ids or self.message_ids:
            parts.append(
                sql.SQL(
                    "(id = ANY(%(sel_ids)s::bigint[]) OR message_id = ANY(%(sel_mids)s::uuid[]))"
                )
            )
            params["sel_ids"], params["sel_mids"] = self.ids, self.message_ids
        if self.statuses:
            parts.append(sql.SQL("status = ANY(%(sel_statuses)s::text[])"))
            params["sel_statuses"] = self.statuses
        if self.expired_claims:
            parts.append(sql.SQL("(status = 'SENT' AND claim_expires_at < now())"))
        for name, clause in (
            ("topic", "topic = %(sel_topic)s"),
            ("key", "key = %(sel_key)s"),
            ("tenant", "tenant = %(sel_tenant)s"),
            ("since", "created_at >= %(sel_since)s"),
            ("until", "created_at < %(sel_until)s"),
        ):
            if getattr(self, name) is not None:
                parts.append(sql.SQL(clause))
                params[f"sel_{name}"] = getattr(self, name)
        if self.error:
            parts.append(
                sql.SQL("strpos(lower(coalesce(last_error, '')), lower(%(sel_error)s)) > 0")
            )
            params["sel_error"] = self.error
        if not parts:
            return sql.SQL("true"), params
        return sql.SQL(" AND ").join(parts), params

    def describe(self) -> dict[str, Any]:
        """The selection as recorded in the audit trail (JSON-ready)."""
        out = {}
        for k, v in asdict(self).items():
            if v in (None, [], False):
                continue
            if isinstance(v, bytes):
                v = v.decode("utf-8", "backslashreplace")
            elif isinstance(v, dt.datetime):
                v = v.isoformat()
            elif isinstance(v, list):
                v = [str(x) for x in v]
            out[k] = v
        return out
