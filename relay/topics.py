"""`outbox topics`: the Kafka topics the outbox's rows name, checked or created.

The relay never creates topics (a typo in a topic name would otherwise become a topic), and a
cluster with auto-creation off fails every row of a missing topic. So the topics are made
beforehand, from what the table says it will deliver plus the names an operator gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

import psycopg

from outbox.message import validate_topic
from outbox.schema import require_schema
from outbox.sql import query

#: How long a cluster gets to answer each request: a wrong bootstrap address ends the command
#: in about this long, with one line, instead of librdkafka's minute of retries.
KAFKA_TIMEOUT = 10.0

#: A topic created whose partitions did not all have a leader within KAFKA_TIMEOUT: a relay
#: started now would fail the rows of a partition without one.
NO_LEADER = "created, no partition leader yet"


@dataclass(frozen=True)
class TopicReport:
    """One topic: whether the cluster has it and in what shape, and what was done about it.

    state is one of: present, missing, created, would create (--dry-run), not created, and
    NO_LEADER (created, but a partition had no leader when the wait ended)."""

    name: str
    state: str
    rows: int = 0  # rows of the table still to be delivered to it
    partitions: int | None = None
    replication_factor: int | None = None
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def undelivered_topics(conn: psycopg.Connection, schema: str) -> dict[str, int]:
    """Each topic that rows the relay may still deliver (PENDING, FAILED, SENT) name, with how
    many rows name it."""
    require_schema(conn, schema)
    return dict(conn.execute(query("relay", "topics.sql", "undelivered_topics", schema)).fetchall())


def valid_names(names: Iterable[str]) -> list[str]:
    """NAMES, checked against Kafka's rules (InvalidTopic names the first bad one)."""
    return [validate_topic(n) for n in names]


def wanted_topics(table: Mapping[str, int], named: Iterable[str]) -> dict[str, int]:
    """The table's topics and the NAMED ones, sorted, each with its row count."""
    out = dict(table)
    for name in named:
        out.setdefault(name, 0)
    return dict(sorted(out.items()))


def check(kafka: Mapping[str, str], topics: Mapping[str, int]) -> list[TopicReport]:
    """Present or missing, for each of TOPICS (name -> rows)."""
    from .kafka import describe_topics

    shapes = describe_topics(kafka, list(topics), timeout=KAFKA_TIMEOUT)
    reports = []
    for name, rows in topics.items():
        shape = shapes[name]
        if shape is None:
            reports.append(TopicReport(name, "missing", rows))
        else:
            reports.append(
                TopicReport(name, "present", rows, shape.partitions, shape.replication_factor)
            )
    return reports


def create(
    kafka: Mapping[str, str],
    topics: Mapping[str, int],
    partitions: int | None,
    replication_factor: int | None,
    *,
    dry_run: bool = False,
) -> list[TopicReport]:
    """Create the missing TOPICS; report every one. An existing topic is left as it is, even
    with fewer partitions than asked: adding partitions would send a key's later messages to
    another partition than its earlier ones, and consumers could read them out of order.
    DRY_RUN: the broker validates the creation and creates nothing."""
    from .kafka import create_topics, wait_for_leaders

    found = check(kafka, topics)
    missing = [r.name for r in found if r.state == "missing"]
    outcomes = create_topics(
        kafka,
        missing,
        partitions,
        replication_factor,
        validate_only=dry_run,
        timeout=KAFKA_TIMEOUT,
    )
    made = [t for t, o in outcomes.items() if o.error is None]
    # Wait until the new topics have leaders: a relay started next can then write to them.
    shapes = {} if dry_run or not made else wait_for_leaders(kafka, made, timeout=KAFKA_TIMEOUT)
    reports = []
    for r in found:
        if r.state == "present":
            note = ""
            if partitions is not None and r.partitions is not None and r.partitions < partitions:
                note = (
                    f"has {r.partitions} partitions, fewer than the {partitions} asked: not "
                    "changed (more partitions would move keys to other partitions)"
                )
            reports.append(replace(r, note=note))
            continue
        outcome = outcomes[r.name]
        if outcome.error is not None:
            reports.append(TopicReport(r.name, "not created", r.rows, note=outcome.error))
        elif dry_run:
            reports.append(
                TopicReport(r.name, "would create", r.rows, partitions, replication_factor)
            )
        else:
            shape = shapes.get(r.name)
            note = "created by another client meanwhile" if outcome.existed else ""
            state = "present" if outcome.existed else "created"
            if shape is None or not shape.leaders:
                state = NO_LEADER
                note = (
                    f"{note}; " if note else ""
                ) + f"a partition had no leader after {KAFKA_TIMEOUT:g}s: check the brokers"
            reports.append(
                TopicReport(
                    r.name,
                    state,
                    r.rows,
                    shape.partitions if shape else partitions,
                    shape.replication_factor if shape else replication_factor,
                    note,
                )
            )
    return reports
