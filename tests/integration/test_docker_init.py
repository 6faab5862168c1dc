"""docker/init_db.py, the compose file's one-shot set-up, against the real PostgreSQL: it
migrates as the owner and makes the relay's least-privilege role, with which the relay then
delivers (no Docker engine needed to prove that part)."""

import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg import sql

import outbox
from tests.conftest import ROOT

INIT = ROOT / "docker" / "init_db.py"


def init(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(INIT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **env},
    )


@pytest.fixture
def relay_role(admin_dsn, empty_dsn):
    """A role name no one uses; dropped after the test, with its grants."""
    name = f"relay_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(empty_dsn, autocommit=True) as c:  # the owner takes its grants back
        if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            ident = sql.Identifier(name)
            c.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(ident))
            c.execute(sql.SQL("REVOKE ALL ON SCHEMA public FROM {}").format(ident))
    with psycopg.connect(admin_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_init_migrates_and_the_relay_delivers_as_its_least_privilege_role(
    empty_dsn, relay_role, bootstrap, topic
):
    password = "rl-" + uuid.uuid4().hex[:12]
    env = {"OUTBOX_DSN": empty_dsn, "RELAY_DB_ROLE": relay_role, "RELAY_DB_PASSWORD": password}
    first = init(env)
    assert first.returncode == 0, first.stderr
    assert "(was absent)" in first.stdout
    assert f"role {relay_role}: login, with the relay's grants" in first.stdout
    again = init(env)  # every `docker compose up` runs it: it must be idempotent
    assert again.returncode == 0, again.stderr
    assert "already up to date" in again.stdout
    assert password not in first.stdout + first.stderr + again.stdout + again.stderr

    with psycopg.connect(empty_dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=topic, key="k", payload={"n": 1})

    relay_dsn = psycopg.conninfo.make_conninfo(empty_dsn, user=relay_role, password=password)
    delivered = subprocess.run(
        [sys.executable, "-m", "relay", "relay", "--once", "--dsn", relay_dsn, "-b", bootstrap],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert delivered.returncode == 0, delivered.stderr[-2000:]
    with psycopg.connect(empty_dsn) as conn:
        statuses = conn.execute("SELECT status FROM local_message").fetchall()
    assert statuses == [("CONFIRMED",)]
    with psycopg.connect(relay_dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("INSERT INTO local_message (topic, payload) VALUES ('x', 'y')")


def test_init_without_a_password_or_with_a_bad_dsn_is_one_line(empty_dsn, relay_role):
    missing = init({"OUTBOX_DSN": empty_dsn, "RELAY_DB_ROLE": relay_role, "RELAY_DB_PASSWORD": ""})
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: set RELAY_DB_PASSWORD, the relay role's password"
    bad = init(
        {
            "OUTBOX_DSN": "postgresql://outbox:wr0ngpass@127.0.0.1:1/none",
            "RELAY_DB_ROLE": relay_role,
            "RELAY_DB_PASSWORD": "secret-pw-x",
        }
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: cannot connect to postgresql://outbox:***@127.0.0.1:1")
    assert "wr0ngpass" not in bad.stderr and "secret-pw-x" not in bad.stdout + bad.stderr
