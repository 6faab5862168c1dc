"""`outbox reconcile`'s records: what Kafka holds at CONFIRMED rows' offsets
(relay/reconcile.py decides what they mean). One read_committed consumer, a chunk's
partitions of a topic at a time, each read forward."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from hashlib import sha256

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from ..model import SEND_MARGIN
from .client import KafkaSettingsError, client_settings, describe, new_client

#: librdkafka's log lines while reconciling: the failures that matter come back as Unavailable
#: and make the command's one error line; the rest are for an application's own handlers.
_reader_log = logging.getLogger("relay.kafka.reader")
_reader_log.addHandler(logging.NullHandler())  # no "last resort" lines on the CLI's stderr

#: Records to read past rather than seek over: a seek costs a fetch round trip (a few ms),
#: reading a record a few microseconds.
SEEK_GAP = 5000


class KafkaRecordSource:
    """reconcile.RecordSource over Kafka. Each read() is a chunk's offsets of one topic, by
    partition: the consumer is assigned every partition wanted at its first offset, so their
    fetches run together (one partition at a time was 4 times slower: a fetch round trip per
    megabyte, and a start-up per partition), and reads each forward, seeking only over a gap
    wider than SEEK_GAP; a partition done is paused, so that it is not fetched further.

    read_committed: a row confirmed in exactly-once mode is in a committed transaction, and a
    row confirmed at least once is a plain record, visible either way; the offsets of aborted
    records and transaction markers are skipped, and so reported as holding no record.

    Every wait is bounded: a partition that gives nothing for TIMEOUT seconds is marked
    unavailable, and its remaining rows are reported unreadable without waiting again."""

    def __init__(
        self,
        config: Mapping[str, str],
        *,
        timeout: float = 15.0,
        batch: int = 1000,
        seek_gap: int = SEEK_GAP,
    ):
        self._errors: list[str] = []
        self._settings = client_settings(config)
        common = {
            **self._settings,
            # Never joined (assign() only) and nothing committed: a name of its own.
            "group.id": f"outbox-reconcile-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "error_cb": self._on_error,
        }
        self._consumer = new_client(
            Consumer,
            {
                **common,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                # An offset deleted under us is an error, not a silent jump to another offset.
                "auto.offset.reset": "error",
                # Bounds what librdkafka prefetches for each partition assigned.
                "queued.max.messages.kbytes": 16384,
                # A fetch the broker holds open (500 ms by default) delays the first fetch of
                # the next assignment: 0.4 s per partition, measured.
                "fetch.wait.max.ms": 10,
            },
            logger=_reader_log,
        )
        # Watermarks. read_uncommitted: its end of a partition is the high
        # watermark, where a read_committed client's is the last stable offset, short of an
        # open transaction's records, which are there but not decided yet (not missing).
        try:
            self._meta = new_client(
                Consumer, {**common, "isolation.level": "read_uncommitted"}, logger=_reader_log
            )
        except KafkaSettingsError:
            self._consumer.close()
            raise
        self._admin: AdminClient | None = None
        self._timeout = timeout
        self._batch = batch
        self._seek_gap = seek_gap
        self._topics: dict[str, frozenset[int]] = {}
        self._broken: dict[tuple[str, int], str] = {}
        self._paused: list[TopicPartition] = []

    def _on_error(self, err: KafkaError) -> None:
        self._errors.append(describe(err))

    def _why(self, text: str) -> str:
        return f"{text} ({self._errors[-1]})" if self._errors else text

    def check(self, timeout: float) -> str | None:
        """None when a broker answers within TIMEOUT seconds, else why not."""
        try:
            self._consumer.list_topics(timeout=timeout)
        except KafkaException as exc:
            return self._why(describe(exc.args[0]))
        return None

    def close(self) -> None:
        self._consumer.close()
        self._meta.close()

    def cleanup_policy(self, topic: str) -> str:
        """TOPIC's cleanup.policy, from DescribeConfigs (the checker asks once a topic, at its
        first offset without a committed record). Raises Unavailable, saying why, when it
        cannot be read."""
        from ..reconcile import Unavailable

        try:
            if self._admin is None:
                self._admin = new_client(AdminClient, self._settings, logger=_reader_log)
            resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
            future = self._admin.describe_configs([resource], request_timeout=self._timeout)
            entries = future[resource].result(timeout=self._timeout + SEND_MARGIN)
            return str(entries["cleanup.policy"].value)
        except KafkaException as exc:
            err = exc.args[0]
            why = describe(err) if isinstance(err, KafkaError) else str(err)
            if isinstance(err, KafkaError) and err.code() in (
                KafkaError.TOPIC_AUTHORIZATION_FAILED,
                KafkaError.CLUSTER_AUTHORIZATION_FAILED,
            ):
                why = f"DescribeConfigs on the topic is not allowed ({why})"
        except FutureTimeout:
            why = f"no answer to DescribeConfigs within {self._timeout:g} s"
        except KafkaSettingsError as exc:
            why = str(exc)
        except KeyError:
            why = "DescribeConfigs gave no cleanup.policy"
        raise Unavailable(why)

    def _partitions(self, topic: str) -> frozenset[int]:
        from ..reconcile import Absent, Unavailable

        if topic not in self._topics:
            try:
                # Asked by the reading consumer: without a metadata request of its own for the
                # topic, its first fetch after assign() came 0.9 s later (measured).
                md = self._consumer.list_topics(topic, timeout=self._timeout).topics.get(topic)
            except KafkaException as exc:
                raise Unavailable(self._why(f"metadata: {describe(exc.args[0])}")) from None
            if md is None or (
                md.error is not None
                and md.error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)
            ):
                raise Absent(f"no topic {topic!r} in the cluster")
            if md.error is not None:
                raise Unavailable(f"metadata: {describe(md.error)}")
            self._topics[topic] = frozenset(md.partitions)
        return self._topics[topic]

    def watermarks(self, topic: str, partition: int) -> tuple[int, int]:
        from ..reconcile import Absent, Unavailable

        partitions = self._partitions(topic)
        if partition not in partitions:
            raise Absent(f"no partition {partition} (topic {topic!r} has {len(partitions)})")
        try:
            low, end = self._meta.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=self._timeout, cached=False
            )
        except KafkaException as exc:
            raise Unavailable(self._why(f"offsets: {describe(exc.args[0])}")) from None
        return low, end

    def _fail(self, topic: str, partition: int, why: str):
        from ..reconcile import Unavailable

        self._broken[(topic, partition)] = why
        return Unavailable(why)

    def read(self, topic: str, wanted: Mapping[int, Sequence[int]]):
        from ..reconcile import Record, Unavailable

        reading: dict[int, _Reading] = {}
        for partition, offsets in wanted.items():
            why = self._broken.get((topic, partition))
            if why is not None:
                yield partition, -1, Unavailable(why)
            elif offsets:
                reading[partition] = _Reading(offsets)
        if not reading:
            return
        # A pause outlives assign(), and a resume after it stalled the fetches for a second
        # (measured): the partitions paused by the last read are resumed before.
        if self._paused:
            self._consumer.resume(self._paused)
            self._paused = []
        # assign() replaces the assignment: librdkafka drops what it had fetched before.
        self._consumer.assign([TopicPartition(topic, p, r.offsets[0]) for p, r in reading.items()])
        consume, gap, eof = self._consumer.consume, self._seek_gap, KafkaError._PARTITION_EOF
        new = tuple.__new__  # a Record without NamedTuple's Python-level __new__
        heard = time.monotonic()
        while reading:  # bounded: each pass hands out records or moves towards the timeout
            # No more than the records up to the last offsets wanted: consume() waits for as
            # many as it is asked for (or its timeout) at a partition's end.
            want = min(self._batch, sum(r.offsets[-1] + 1 - r.next for r in reading.values()))
            try:
                batch = consume(max(1, want), timeout=0.2)
            except KafkaException as exc:
                why = describe(exc.args[0])
                for partition in list(reading):
                    yield partition, -1, self._fail(topic, partition, why)
                return
            if not batch:
                if time.monotonic() - heard > self._timeout:
                    for partition in list(reading):
                        why = f"no answer from {topic} [{partition}] within {self._timeout:g} s"
                        yield partition, -1, self._fail(topic, partition, self._why(why))
                    return
                continue
            heard = time.monotonic()
            for msg in batch:
                # None for a client-wide event: no partition read is None.
                partition = msg.partition()  # type: ignore[assignment]
                r = reading.get(partition)
                if r is None:
                    # A partition done. The assignment holds this topic only, and librdkafka
                    # drops what it fetched for an earlier assign() or seek (no topic()
                    # call a record: 0.1 us each).
                    continue
                err = msg.error()
                if err is not None and err.code() != eof:
                    del reading[partition]
                    yield partition, -1, self._fail(topic, partition, describe(err))
                    continue
                offset = msg.offset() or 0
                if offset < r.next:
                    continue  # fetched before an assign() or a seek
                offsets, i, n = r.offsets, r.i, r.n
                if err is not None:
                    # The end of what a read_committed reader sees: offsets before it that did
                    # not come hold no committed record; those at or after it are in a
                    # transaction not decided yet.
                    while i < n and offsets[i] < offset:
                        yield partition, offsets[i], None
                        i += 1
                    r.i = i
                    del reading[partition]
                    if i < n:  # and so are the partition's later rows: no wait for them
                        why = (
                            f"beyond the last stable offset ({offset}): in a Kafka "
                            "transaction not committed yet"
                        )
                        yield partition, -1, self._fail(topic, partition, why)
                    continue
                r.next = offset + 1
                while i < n and offsets[i] < offset:
                    yield partition, offsets[i], None
                    i += 1
                if i < n and offsets[i] == offset:
                    # Record.of, inlined: this runs once a row. Header values are bytes as
                    # consumed (the typing also allows the str a producer may give).
                    message_id: bytes | None = None
                    for name, found in msg.headers() or ():  # type: ignore[str-unpack]
                        if name == "message_id":
                            message_id = found  # type: ignore[assignment]
                            break
                    value = msg.value()
                    digest = sha256(value).digest() if value is not None else b""
                    yield partition, offset, new(Record, (message_id, msg.key(), digest))
                    i += 1
                r.i = i
                if i == n:  # no further fetches of it: they would be thrown away
                    del reading[partition]
                    done = [TopicPartition(topic, partition)]
                    self._consumer.pause(done)
                    self._paused += done
                elif offsets[i] - r.next > gap:
                    try:
                        self._consumer.seek(TopicPartition(topic, partition, offsets[i]))
                    except KafkaException:
                        continue  # not fetching yet (assign() is asynchronous): read on
                    r.next = offsets[i]
            # Silence counts from here: while the checker held this generator (it may have
            # asked for a topic's cleanup.policy meanwhile), no partition was waited for.
            heard = time.monotonic()


class _Reading:
    """One partition of a read: the offsets wanted, the next of them, and the offset after the
    last record seen (records below it are stale: fetched before an assign() or a seek)."""

    __slots__ = ("i", "n", "next", "offsets")

    def __init__(self, offsets: Sequence[int]):
        self.offsets, self.i, self.n, self.next = offsets, 0, len(offsets), offsets[0]
