"""`outbox topics create` when a new topic's partitions have no leader within the wait: it is
reported as such and the command exits 1, so that a script does not start a relay that would
fail the topic's rows. The admin calls are replaced by fakes: no cluster needed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from relay import kafka
from relay.cli import main
from relay.kafka import TopicCreation, TopicShape
from relay.topics import NO_LEADER, create


@pytest.fixture
def cluster(monkeypatch):
    """A cluster with topic "old"; creations succeed; LEADERLESS: the topics whose partitions
    have no leader when the wait for leaders ends."""
    leaderless: set[str] = set()
    existing = {"old": TopicShape(3, 1)}

    def describe_topics(_config, names, timeout=10.0):
        return {n: existing.get(n) for n in names}

    def create_topics(_config, names, partitions, replication_factor, **_kw):
        return {n: TopicCreation(None) for n in names}

    def wait_for_leaders(_config, names, timeout=10.0):
        return {n: None if n == "gone" else TopicShape(2, 1, n not in leaderless) for n in names}

    monkeypatch.setattr(kafka, "describe_topics", describe_topics)
    monkeypatch.setattr(kafka, "create_topics", create_topics)
    monkeypatch.setattr(kafka, "wait_for_leaders", wait_for_leaders)
    return leaderless


def test_a_new_topic_without_a_leader_yet_is_reported_so(cluster):
    cluster.add("slow")
    reports = {r.name: r for r in create({}, {"old": 0, "fine": 0, "slow": 4, "gone": 0}, 2, 1)}
    assert reports["old"].state == "present"
    assert reports["fine"].state == "created" and reports["fine"].note == ""
    assert reports["slow"].state == NO_LEADER == "created, no partition leader yet"
    assert "no leader" in reports["slow"].note and reports["slow"].partitions == 2
    assert reports["gone"].state == NO_LEADER  # not even in the metadata when the wait ended


def test_topics_create_exits_1_when_a_topic_has_no_leader(cluster, monkeypatch):
    monkeypatch.setenv("OUTBOX_DSN", "")
    args = ["topics", "create", "--no-table", "-b", "127.0.0.1:9", "--topic", "fine"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fine: created, 2 partitions" in result.output

    cluster.add("slow")
    result = CliRunner().invoke(main, [*args, "--topic", "slow"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert "fine: created, 2 partitions, replication factor 1" in lines
    assert any(
        line.startswith("slow: created, no partition leader yet, 2 partitions") for line in lines
    )
    assert lines[-1].startswith("error: 1 of 2 topics created without a leader")
    assert "slow" in lines[-1]
