"""Fixtures for the real PostgreSQL and Kafka started by scripts/services.

A test that needs a service skips with the reason when the service is not there, except under
CI=true, where a missing service is a failure: CI must prove everything against the real pair.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _services_env() -> dict[str, str]:
    """What scripts/services exports (DSN, bootstrap servers, the test SASL listener), with
    OUTBOX_* variables already set in the environment taking precedence."""
    env: dict[str, str] = {}
    try:
        out = subprocess.run(
            [str(ROOT / "scripts" / "services"), "env"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'")
    env.update({k: v for k, v in os.environ.items() if k.startswith("OUTBOX_")})
    return env


SERVICES = _services_env()


def unavailable(what: str, why: str):
    message = f"{what} is not reachable ({why}); start it with `scripts/services up`"
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def with_dbname(dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    dsn = SERVICES.get("OUTBOX_DSN", "")
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        unavailable("PostgreSQL", str(exc).strip().splitlines()[0] if str(exc) else "error")
    return dsn


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> Iterator[str]:
    """A database with schema.sql applied, built once per session and cloned per test."""
    from outbox import apply_schema

    name = f"outbox_tmpl_{os.getpid()}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(with_dbname(admin_dsn, name)) as conn:
        apply_schema(conn)
        conn.commit()
    yield name
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh database holding the outbox schema, dropped after the test."""
    name = f"outbox_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield with_dbname(admin_dsn, name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def empty_dsn(admin_dsn: str) -> Iterator[str]:
    """A fresh database without the outbox schema."""
    name = f"outbox_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield with_dbname(admin_dsn, name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn) as c:
        yield c


@pytest.fixture(scope="session")
def bootstrap() -> str:
    from tests.kafka_helpers import check_kafka

    servers = SERVICES.get("OUTBOX_BOOTSTRAP_SERVERS", "")
    problem = check_kafka(servers)
    if problem:
        unavailable("Kafka", problem)
    return servers


@pytest.fixture
def topic(bootstrap: str) -> Iterator[str]:
    """A new topic with 3 partitions, deleted after the test."""
    from tests.kafka_helpers import create_topic, delete_topic

    name = f"t.{uuid.uuid4().hex[:12]}"
    create_topic(bootstrap, name, partitions=3)
    yield name
    delete_topic(bootstrap, name)


@pytest.fixture
def relays(dsn, bootstrap, tmp_path):
    """Start `outbox relay` processes (tests.relay_process); whatever is still alive at the
    end is killed."""
    from tests.relay_process import RelayProcess

    started: list[RelayProcess] = []

    def start(name: str, **env) -> RelayProcess:
        proc = RelayProcess(name, dsn, bootstrap, tmp_path, **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            proc.kill()
