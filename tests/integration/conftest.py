"""Fixtures and helpers shared by the integration tests that run relays as processes."""

import psycopg
import pytest

import outbox
from tests.relay_process import RelayProcess


@pytest.fixture
def relays(dsn, bootstrap, tmp_path):
    started: list[RelayProcess] = []

    def start(name: str, **env) -> RelayProcess:
        proc = RelayProcess(name, dsn, bootstrap, tmp_path, **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            proc.kill()


def counts(dsn):
    with psycopg.connect(dsn) as c:
        return dict(c.execute("SELECT status, count(*) FROM local_message GROUP BY 1").fetchall())


def all_confirmed(dsn, total):
    return counts(dsn).get("CONFIRMED", 0) == total


def write(dsn, topic, n, keys, start=0, per_tx=100):
    with psycopg.connect(dsn) as conn:
        for base in range(start, start + n, per_tx):
            with conn.transaction():
                outbox.publish_many(
                    conn,
                    [
                        dict(topic=topic, key=f"key-{i % keys}", payload={"i": i})
                        for i in range(base, min(base + per_tx, start + n))
                    ],
                )
