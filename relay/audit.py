"""The audit trail's hash chain: what `outbox audit verify` concludes from it (no I/O).

Every entry of local_message_audit stores the previous entry's hash (prev_hash) and its own
(hash), both written by the trigger local_message_audit_chain with local_message_audit_hash()
(schema.sql). The verifier does not call that function: whoever can edit the table (its owner,
a superuser) can also replace the function, for instance by one that returns the stored hash.
entry_hash() below recomputes each hash from the entry's fields as read, so a verdict depends
on the data and this code only. tests/integration/test_audit_chain.py proves that the two
implementations agree. This module reads the resulting links, in id order, and names what does
not fit: an entry whose contents no longer match its hash (edited), a link to a hash no entry
has (an entry deleted before it), a link to another entry than the one before it (reordered),
and a recorded head that is gone (a truncated tail).

Ids are not expected to be contiguous: a rolled-back transaction uses up an id too. Whether an
entry is missing is for the links to say.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MICROSECOND = dt.timedelta(microseconds=1)

#: Which entries carry these hashes: {hash: id}.
Holders = Callable[[Collection[bytes]], dict[bytes, int]]


@dataclass(frozen=True)
class Link:
    """One entry as the verifier sees it: its stored hashes, and whether its contents still
    hash to its stored hash."""

    id: int
    prev_hash: bytes | None
    hash: bytes
    intact: bool


def _netstring(value: bytes | None) -> bytes:
    return b"-" if value is None else b"%d:%s," % (len(value), value)


def _utf8(text: str | None) -> bytes | None:
    return None if text is None else text.encode("utf-8")


def entry_hash(
    prev_hash: bytes | None,
    entry_id: int,
    at: dt.datetime,
    actor: str,
    db_user: str,
    action: str,
    selection: str,
    affected: int,
    ids: str | None,
    reason: str | None,
) -> bytes:
    """An entry's hash by the canonical encoding (docs/operations.md, "The hash"): sha256 over
    netstrings of the version tag and the fields, `-` for NULL. SELECTION and IDS are the
    columns' PostgreSQL text forms as read (`selection::text`, `ids::text`), since the
    encoding is those texts and this side does not re-serialise them."""
    micros = (at - _EPOCH) // _MICROSECOND
    fields = (
        b"outbox-audit-v1",
        prev_hash,
        str(entry_id).encode(),
        str(micros).encode(),
        _utf8(actor),
        _utf8(db_user),
        _utf8(action),
        _utf8(selection),
        str(affected).encode(),
        _utf8(ids),
        _utf8(reason),
    )
    return hashlib.sha256(b"".join(_netstring(f) for f in fields)).digest()


def entry_link(
    entry_id: int,
    prev_hash: bytes | None,
    stored_hash: bytes,
    at: dt.datetime,
    actor: str,
    db_user: str,
    action: str,
    selection: str,
    affected: int,
    ids: str | None,
    reason: str | None,
) -> Link:
    """The Link of an entry read by the audit_chain query (relay/operations.sql), in its
    column order: whether its fields still hash to its stored hash, by entry_hash()."""
    prev = None if prev_hash is None else bytes(prev_hash)
    computed = entry_hash(
        prev, entry_id, at, actor, db_user, action, selection, affected, ids, reason
    )
    return Link(entry_id, prev, bytes(stored_hash), computed == bytes(stored_hash))


@dataclass(frozen=True)
class Finding:
    #: edited, deleted, reordered or truncated
    kind: str
    #: the entry it is about (for truncated: the last entry there is, None if none)
    id: int | None
    message: str


@dataclass
class Report:
    entries: int = 0
    head: bytes | None = None
    head_id: int | None = None
    expected_head: bytes | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "entries": self.entries,
            "head": self.head.hex() if self.head else None,
            "head_id": self.head_id,
            "expected_head": self.expected_head.hex() if self.expected_head else None,
            "findings": [{"kind": f.kind, "id": f.id, "message": f.message} for f in self.findings],
        }


def parse_head(text: str) -> bytes:
    """A head hash as `outbox audit verify` prints it: 64 hexadecimal characters."""
    if not _HEX_RE.fullmatch(text.strip()):
        raise ValueError(
            "--expect-head takes a head hash as `outbox audit verify` prints it "
            "(64 hexadecimal characters)"
        )
    return bytes.fromhex(text.strip())


def check_chain(
    links: Iterable[Link], holders: Holders, expect_head: bytes | None = None
) -> Report:
    """Walk LINKS (in id order) once; HOLDERS is asked, once, where the hashes that broken
    links and EXPECT_HEAD point to are."""
    report = Report(expected_head=expect_head)
    edited: list[Finding] = []
    # (entry id, id of the entry before it or None, the hash the entry links to)
    broken: list[tuple[int, int | None, bytes | None]] = []
    before: Link | None = None
    for link in links:
        report.entries += 1
        if not link.intact:
            edited.append(
                Finding(
                    "edited", link.id, f"entry {link.id} edited: its contents do not match its hash"
                )
            )
        expected = before.hash if before else None
        if link.prev_hash != expected:
            broken.append((link.id, before.id if before else None, link.prev_hash))
        before = link
    if before is not None:
        report.head, report.head_id = before.hash, before.id

    wanted = {h for _, _, h in broken if h is not None}
    if expect_head is not None:
        wanted.add(expect_head)
    found = holders(wanted) if wanted else {}

    findings = list(edited)
    for entry, previous, target in broken:
        findings.append(
            _broken_link(entry, previous, target, found.get(target) if target else None)
        )
    if expect_head is not None and expect_head not in found:
        end = f"the chain now ends at id {report.head_id}" if report.head_id else "it is empty"
        findings.append(
            Finding(
                "truncated",
                report.head_id,
                f"truncated: no entry has the expected head {expect_head.hex()}; {end} "
                "(entries after it deleted, or the chain rewritten)",
            )
        )
    findings.sort(key=lambda f: (f.id is None, f.id or 0, f.kind))
    report.findings = findings
    return report


def _broken_link(entry: int, previous: int | None, target: bytes | None, holder: int | None):
    if target is None:  # the entry says it was the first one written
        return Finding(
            "reordered",
            entry,
            f"entries reordered: entry {entry} was written first, but follows entry {previous}",
        )
    if holder is not None:
        after = f"not to entry {previous} before it" if previous else "but comes first by id"
        return Finding(
            "reordered", entry, f"entries reordered: entry {entry} links to entry {holder}, {after}"
        )
    if previous is None:
        return Finding(
            "deleted",
            entry,
            f"entry before id {entry} deleted: the first entry links to a hash no entry has",
        )
    return Finding(
        "deleted",
        entry,
        f"entry after id {previous} deleted: entry {entry} links to a hash no entry has "
        f"(or entry {previous} was rewritten together with its hash)",
    )
