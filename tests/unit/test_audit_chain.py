"""relay.audit reads a chain's links and names what does not fit (no database: the hashes here
are stand-ins; tests/integration/test_audit_chain.py runs the real ones)."""

from __future__ import annotations

import pytest

from relay.audit import Link, check_chain, parse_head


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
