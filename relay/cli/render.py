"""How the commands show values: ages, payloads, JSON."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
from typing import Any

from ..selection import key_text


def show_payload(payload: bytes) -> str:
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        shown = payload[:512].hex(" ")
        return f"({len(payload)} bytes, not UTF-8) {shown}{' ...' if len(payload) > 512 else ''}"


def payload_for_json(payload: bytes) -> tuple[Any, str]:
    """The payload as a JSON value when it is JSON that Python reads back exactly, else as
    text, else base64; and which. Exactly: an amount like 12345678901234567.89 would come out
    as 1.2345678901234568e+16 through a float, and of a duplicated key one value would be
    lost; such a payload is shown as its text."""
    try:
        return json.loads(
            payload,
            parse_float=_exact_float,
            parse_constant=_not_json,
            object_pairs_hook=_without_duplicates,
        ), "json"
    except (ValueError, ArithmeticError):
        pass
    try:
        return payload.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), "base64"


def _exact_float(text: str) -> float:
    value = float(text)
    if decimal.Decimal(repr(value)) != decimal.Decimal(text):
        raise ArithmeticError(f"{text} is not exact as a float")
    return value


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")  # NaN, Infinity: Python's extension, not JSON


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def age(when: dt.datetime | None) -> str:
    if when is None:
        return "-"
    seconds = (dt.datetime.now(dt.timezone.utc) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def waits(row: dict[str, Any]) -> str:
    """Why a PENDING row is not sent yet: held behind a row of its key, or its next try; when
    a SCHEDULED row falls due."""
    if row["status"] == "SCHEDULED" and row.get("deliver_at") is not None:
        wait = (row["deliver_at"] - dt.datetime.now(dt.timezone.utc)).total_seconds()
        return f"due in {duration(wait)}" if wait >= 0 else f"overdue by {duration(-wait)}"
    if row["status"] != "PENDING":
        return ""
    if row["held_by"] is not None:
        return f"held by {row['held_by']}"
    if row["next_attempt_at"] is not None:
        wait = (row["next_attempt_at"] - dt.datetime.now(dt.timezone.utc)).total_seconds()
        return f"retry in {max(wait, 0):.0f}s"
    return ""


def duration(value: float) -> str:
    """Seconds as an operator reads a wait: 45s, 12m, 5h, 3d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= 2 * size:
            return f"{value / size:.0f}{unit}"
    return f"{value:.0f}s"


def described(selection) -> str:
    return " ".join(f"{k}={v}" for k, v in selection.describe().items())


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return key_text(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return str(value)
