"""Shards of buckets and the progress records of exactly-once delivery. No I/O here.

In exactly-once mode the 256 buckets are grouped into SHARDS equal runs of consecutive buckets;
shard s holds buckets [s * w, (s + 1) * w) with w = 256 / SHARDS. A relay owns whole shards
(the store leases them whole), each shard has one transactional producer (transactional.id
``<prefix>-<shard>``), and each batch of a shard is one Kafka transaction that ends with a
progress record on partition ``shard`` of the progress topic: the rows the transaction
carries, and the rows delivered before whose CONFIRMED status may not be written yet, each by
its id and a tag of its message_id. A relay that takes a shard reads the last committed record
and confirms those rows before it sends anything (docs/design.md, "Exactly-once delivery").

At-least-once mode leases single buckets: 256 shards of one bucket each.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from .model import BUCKETS, fair_share

#: The progress record's layout: this byte, then varints: shard count, shard, row count, the
#: ids in ascending order as differences (the first from 0), then each row's tag in the same
#: order. Row ids of one batch are close together: two or three bytes an id, plus its tag.
PROGRESS_VERSION = 1

#: The last TAG_BYTES bytes of a row's message_id (random in a UUIDv7). A row is confirmed from
#: a record only if its id and its tag both match: ids alone would match other rows after the
#: table was restored from a backup (its sequence set back) or recreated, or with a progress
#: topic shared by mistake, and those rows would be confirmed without being sent.
TAG_BYTES = 8

#: The most a row takes in a progress record: a 10-byte varint (a difference of ids, at worst)
#: and its tag.
PROGRESS_BYTES_PER_ROW = 10 + TAG_BYTES

#: Most rows one progress record may carry: under 1 MB (Kafka's default max.message.bytes)
#: even at PROGRESS_BYTES_PER_ROW. A shard with more unconfirmed rows waits for the database.
MAX_PROGRESS_IDS = 50_000

#: (row id, tag): how a progress record names a row.
Named = tuple[int, bytes]


def message_tag(message_id: object) -> bytes:
    """The tag of a row's message_id (a uuid.UUID, or its text)."""
    value = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(str(message_id))
    return value.bytes[-TAG_BYTES:]


class ProgressError(ValueError):
    """A progress record this relay cannot read: written by something else, or for another
    shard count."""


def validate_shards(shards: int) -> int:
    if not 1 <= shards <= BUCKETS or BUCKETS % shards:
        raise ValueError(f"shards must divide {BUCKETS} (1, 2, 4, ... 256), not {shards}")
    return shards


def shard_of(bucket: int, shards: int) -> int:
    return bucket // (BUCKETS // shards)


def buckets_of(shard: int, shards: int) -> range:
    width = BUCKETS // shards
    return range(shard * width, (shard + 1) * width)


def whole_shards(buckets: Iterable[int], shards: int) -> set[int]:
    """The shards every bucket of which is in BUCKETS."""
    width = BUCKETS // shards
    counts: dict[int, int] = {}
    for b in buckets:
        counts[b // width] = counts.get(b // width, 0) + 1
    return {s for s, n in counts.items() if n == width}


def plan_lease(owned: Iterable[int], alive: int, rank: int, shards: int) -> tuple[list[int], int]:
    """What a relay of RANK among ALIVE relays does with the buckets it OWNED after renewing
    them: (buckets to give back, how many whole shards to acquire). Buckets of shards it owns
    only in part are given back (another mode, or a shard count changed, left them split); the
    highest shards beyond its fair share of shards too. Nothing of what is given back is in
    flight: the relay renews its leases only between batches."""
    owned = set(owned)
    target = fair_share(alive, rank, shards)
    keep = set(sorted(whole_shards(owned, shards))[:target])
    release = sorted(b for b in owned if shard_of(b, shards) not in keep)
    return release, max(0, target - len(keep))


def _varint(n: int, out: bytearray) -> None:
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def encode_progress(shards: int, shard: int, rows: Iterable[Named]) -> bytes:
    ordered = sorted(dict(rows).items())
    if len(ordered) > MAX_PROGRESS_IDS:
        raise ValueError(f"{len(ordered)} rows do not fit one progress record")
    out = bytearray([PROGRESS_VERSION])
    for n in (shards, shard, len(ordered)):
        _varint(n, out)
    previous = 0
    for row_id, _ in ordered:
        _varint(row_id - previous, out)
        previous = row_id
    for _, tag in ordered:
        if len(tag) != TAG_BYTES:
            raise ValueError(f"a tag is {TAG_BYTES} bytes, not {len(tag)}")
        out += tag
    return bytes(out)


def decode_progress(value: bytes, shards: int, shard: int) -> list[Named]:
    """The rows a progress record of SHARD names; ProgressError if it is not one."""
    if not value or value[0] != PROGRESS_VERSION:
        raise ProgressError("not a progress record of this relay (unknown version)")
    numbers: list[int] = []
    n = shift = 0
    at = 1
    while at < len(value) and (len(numbers) < 3 or len(numbers) < 3 + numbers[2]):
        byte = value[at]
        at += 1
        n |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            numbers.append(n)
            n = shift = 0
    if shift or len(numbers) < 3 or len(numbers) != 3 + numbers[2]:
        raise ProgressError("a truncated or malformed progress record")
    if len(value) - at != numbers[2] * TAG_BYTES:
        raise ProgressError("a truncated or malformed progress record (its tags)")
    if numbers[0] != shards or numbers[1] != shard:
        raise ProgressError(
            f"the record is of shard {numbers[1]} of {numbers[0]}, read as shard {shard} of "
            f"{shards}: the shard count changed while rows were unconfirmed"
        )
    rows, previous = [], 0
    for i, delta in enumerate(numbers[3:]):
        previous += delta
        rows.append((previous, value[at + i * TAG_BYTES : at + (i + 1) * TAG_BYTES]))
    return rows


def group_by_shard(items: Sequence, shards: int) -> dict[int, list]:
    """ITEMS (with a .bucket) by shard, each list in the given order."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(shard_of(item.bucket, shards), []).append(item)
    return groups
