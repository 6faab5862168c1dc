"""relay.audit reads a chain's links and names what does not fit (no database: the hashes here
are stand-ins; tests/integration/test_audit_chain.py runs the real ones)."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from relay.audit import Link, check_chain, entry_hash, entry_link, parse_head


def h(n: int) -> bytes:
    return bytes([n]) * 32


def chain(*ids: int) -> list[Link]:
    """Intact entries with these ids, each linked to the one before."""
    links, prev = [], None
    for i in ids:
        links.append(Link(i, prev, h(i), True))
        prev = h(i)
    return links


def holders_of(links: list[Link]):
    asked: list[set[bytes]] = []

    def holders(hashes):
        asked.append(set(hashes))
        return {link.hash: link.id for link in links if link.hash in hashes}

    return holders, asked


def messages(links, expect_head=None):
    holders, _ = holders_of(links)
    return [(f.kind, f.id) for f in check_chain(links, holders, expect_head).findings]


def test_an_intact_chain_with_id_gaps_is_valid_and_reports_its_head():
    links = chain(1, 2, 5, 9)  # a rolled-back append uses up an id: gaps are normal
    holders, asked = holders_of(links)
    report = check_chain(links, holders)
    assert report.valid and (report.entries, report.head, report.head_id) == (4, h(9), 9)
    assert asked == [], "nothing to look up when every link holds"


def test_edited_deleted_reordered_and_truncated_are_told_apart():
    links = chain(1, 2, 3, 4, 5)
    links[1] = Link(2, h(1), h(2), False)  # edited
    del links[2]  # 3 deleted: 4 links to a hash nobody has
    assert messages(links) == [("edited", 2), ("deleted", 4)]
    swapped = chain(1, 2, 3, 4)
    swapped[1], swapped[2] = Link(2, h(2), h(3), True), Link(3, h(1), h(2), True)
    assert messages(swapped) == [("reordered", 2), ("reordered", 3), ("reordered", 4)]
    assert messages(chain(2, 3)[1:]) == [("deleted", 3)]  # the first entry is gone
    assert messages(chain(1, 2), expect_head=h(3)) == [("truncated", 2)]
    assert messages(chain(1, 2, 3), expect_head=h(2)) == []
    assert messages([], expect_head=h(1)) == [("truncated", None)]


def test_an_entry_that_claims_to_be_first_in_the_middle_is_reordered():
    links = chain(1, 2)
    links.append(Link(3, None, h(3), True))
    holders, _ = holders_of(links)
    (finding,) = check_chain(links, holders).findings
    assert finding.kind == "reordered" and "entry 3 was written first" in finding.message


@pytest.mark.parametrize("text", ["", "zz" * 32, "ab" * 31, "ab" * 33, "0x" + "ab" * 31])
def test_a_malformed_head_is_refused(text):
    with pytest.raises(ValueError, match="64 hexadecimal characters"):
        parse_head(text)


def test_a_head_is_read_in_either_case():
    assert parse_head("AB" * 32) == parse_head(" " + "ab" * 32 + "\n") == bytes([0xAB]) * 32


# --------------------------------------------------------------------------- the encoding


def test_entry_hash_is_the_documented_encoding():
    """The encoding as docs/operations.md states it, written out by hand for two entries."""
    at = dt.datetime(2026, 1, 5, 10, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    first = (
        b"15:outbox-audit-v1,"
        b"-"  # no previous entry
        b"2:12,"
        b"16:1767603600123456,"  # 09:00:00.123456 UTC
        b"6:zo\xc3\xab@h,"
        b"3:ops,"
        b"6:replay,"
        b'14:{"ids": ["7"]},'
        b"1:3,"
        b"10:{7,NULL,8},"
        b"-"  # no reason
    )
    h1 = entry_hash(None, 12, at, "zoë@h", "ops", "replay", '{"ids": ["7"]}', 3, "{7,NULL,8}", None)
    assert h1 == hashlib.sha256(first).digest()
    before_1970 = dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc)
    second = b"15:outbox-audit-v1,32:" + h1 + b",2:13,2:-1,0:,0:,5:purge,2:{},1:0,-0:,"
    assert entry_hash(h1, 13, before_1970, "", "", "purge", "{}", 0, None, "") == (
        hashlib.sha256(second).digest()
    )


def test_ids_are_hashed_as_their_array_text():
    """NULL elements and explicit bounds are part of the ids: no two of these hash alike."""
    at = dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc)
    texts = [None, "{}", "{1,2}", "{1,NULL,2}", "[5:6]={1,2}", "{12}", "{1,2,NULL}"]
    hashes = {entry_hash(None, 1, at, "a", "b", "skip", "{}", 2, t, None) for t in texts}
    assert len(hashes) == len(texts)


def test_an_entry_is_intact_when_its_fields_hash_to_its_stored_hash():
    at = dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc)
    fields = (at, "a", "b", "skip", "{}", 2, "{1,2}", None)
    stored = entry_hash(h(1), 7, *fields)
    assert entry_link(7, h(1), stored, *fields) == Link(7, h(1), stored, True)
    assert not entry_link(7, h(1), stored, at, "a", "b", "skip", "{}", 2, "{1,NULL,2}", None).intact
    assert not entry_link(8, h(1), stored, *fields).intact  # moved to another id
    assert not entry_link(7, h(2), stored, *fields).intact  # linked elsewhere
