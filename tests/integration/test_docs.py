"""Every Python snippet in docs/writing-events.md and docs/consuming.md runs as written against
a fresh database; those of consuming.md also against the local Kafka, with a few events
delivered to the topic `accounts` by the relay first."""

import os
import re
import subprocess
import sys

import psycopg
import pytest

import outbox
from tests.conftest import ROOT

PAGES = {"writing-events.md": 8, "consuming.md": 4}  # the least number of snippets each has
SNIPPETS = {
    page: re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text("utf-8"), re.S)
    for page in PAGES
}


@pytest.mark.parametrize("page", PAGES)
def test_the_page_has_snippets(page):
    assert len(SNIPPETS[page]) >= PAGES[page]


@pytest.mark.parametrize(
    "page, index", [(page, i) for page in PAGES for i in range(len(SNIPPETS[page]))]
)
def test_snippet_runs(page, index, dsn, request):
    url = "postgresql://" + dsn_to_url(dsn)
    env = {**os.environ, "OUTBOX_DSN": url}
    if page == "consuming.md":
        env["OUTBOX_BOOTSTRAP_SERVERS"] = request.getfixturevalue("bootstrap")
        deliver_events(env)
    code = SNIPPETS[page][index]
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"{page} snippet {index}:\n{code}\n{result.stderr}"


def deliver_events(env: dict[str, str]) -> None:
    """Three events on the topic `accounts` (made if missing), delivered by `outbox relay`."""
    from confluent_kafka.admin import AdminClient

    from tests.kafka_helpers import create_topic

    servers = env["OUTBOX_BOOTSTRAP_SERVERS"]
    if "accounts" not in AdminClient({"bootstrap.servers": servers}).list_topics(timeout=10).topics:
        create_topic(servers, "accounts", partitions=3)
    with psycopg.connect(env["OUTBOX_DSN"]) as conn, conn.transaction():
        outbox.publish_many(
            conn,
            [
                {
                    "topic": "accounts",
                    "key": f"account-{n}",
                    "payload": {"type": "AccountOpened", "account": n},
                }
                for n in range(3)
            ],
        )
    subprocess.run(
        [sys.executable, "-m", "relay", "relay", "--once", "--no-listen"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )


def dsn_to_url(dsn: str) -> str:
    p = psycopg.conninfo.conninfo_to_dict(dsn)
    return f"{p['user']}:{p['password']}@{p['host']}:{p['port']}/{p['dbname']}"
