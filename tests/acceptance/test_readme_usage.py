"""The README's Usage section, run as a newcomer runs it: its shell commands and its Python
snippet as written, in a copy of the checkout, against the local PostgreSQL and Kafka.

Two things are the test's own: it saves the snippet as `debit.py` (as the README asks), and it
starts the `outbox relay` line in the background (the README runs it in a terminal of its own),
waits until nothing is PENDING, and stops it with SIGTERM after the lines that follow it. The
database is a fresh one: `scripts/services env` names it when OUTBOX_SERVICES_DATABASE is set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid

import psycopg

from tests.conftest import ROOT
from tests.kafka_helpers import delete_topic, read_all

TOPIC = "payments"  # the README's


def usage_blocks() -> list[tuple[str, str]]:
    """The (language, code) blocks of the README's Usage section, in order."""
    text = (ROOT / "README.md").read_text("utf-8")
    section = text.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(sh|python)\n(.*?)```", section, re.S)


def script_of(blocks: list[tuple[str, str]]) -> str:
    """One bash script running every shell line as written, the relay in the background."""
    lines = ["set -euo pipefail"]
    for language, code in blocks:
        if language == "python":
            lines.append("cat > debit.py <<'README_SNIPPET'\n" + code + "README_SNIPPET")
            continue
        for line in code.splitlines():
            if re.match(r"outbox relay\b", line):
                lines += [
                    line.split("#")[0].strip() + " > relay.log 2>&1 & relay_pid=$!",
                    "trap 'kill -TERM $relay_pid 2>/dev/null || true' EXIT",
                    "deadline=$((SECONDS + 60))",
                    "until outbox status --json | python -c 'import json, sys;"
                    ' sys.exit(json.load(sys.stdin)["counts"]["PENDING"] != 0)\'; do',
                    "  ((SECONDS < deadline)) || { echo 'relay did not deliver in 60 s'; exit 1; }",
                    "  sleep 0.2",
                    "done",
                ]
            else:
                lines.append(line)
    lines += ["kill -TERM $relay_pid", "wait $relay_pid", "trap - EXIT"]
    return "\n".join(lines) + "\n"


def test_the_usage_section_has_what_a_newcomer_needs():
    blocks = usage_blocks()
    shell = "\n".join(code for language, code in blocks if language == "sh")
    assert [language for language, _ in blocks].count("python") == 1
    for needed in ("pip install", "scripts/services env", "outbox migrate", "outbox topics create"):
        assert needed in shell, needed
    assert re.search(r"^outbox relay\b", shell, re.M) and "outbox status" in shell


def test_the_usage_section_runs_as_written(empty_dsn, bootstrap, tmp_path):
    checkout = tmp_path / "outbox-relay"
    shutil.copytree(
        ROOT,
        checkout,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".services", "__pycache__", ".*_cache", "bench-results*"
        ),
    )
    database = psycopg.conninfo.conninfo_to_dict(empty_dsn)["dbname"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env["OUTBOX_SERVICES_DATABASE"] = database
    try:
        result = subprocess.run(
            ["bash", "-c", script_of(usage_blocks())],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = (checkout / "relay.log").read_text() if (checkout / "relay.log").exists() else ""
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\nrelay:\n{log}"
        published = re.search(r"^published ([0-9a-f-]{36})$", result.stdout, re.M)
        assert published, result.stdout
        message_id = uuid.UUID(published.group(1))
        assert "version" in result.stdout and "CONFIRMED" in result.stdout
        records = read_all(bootstrap, TOPIC, expected=1)
        [record] = [r for r in records if r.header("message_id") == str(message_id).encode()]
        assert record.key == b"account-1"
        with psycopg.connect(empty_dsn) as conn:
            assert conn.execute("SELECT balance FROM account").fetchone() == (90,)
            assert conn.execute("SELECT status FROM local_message").fetchall() == [("CONFIRMED",)]
    finally:
        delete_topic(bootstrap, TOPIC)
