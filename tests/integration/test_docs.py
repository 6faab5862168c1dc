"""Every Python snippet in docs/writing-events.md runs as written against a fresh database."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DOC = ROOT / "docs" / "writing-events.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text("utf-8"), re.S)


def test_the_page_has_snippets():
    assert len(SNIPPETS) >= 8


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, dsn):
    url = "postgresql://" + dsn_to_url(dsn)
    result = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index]],
        env={**os.environ, "OUTBOX_DSN": url},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"snippet {index}:\n{SNIPPETS[index]}\n{result.stderr}"


def dsn_to_url(dsn: str) -> str:
    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(dsn)
    return f"{p['user']}:{p['password']}@{p['host']}:{p['port']}/{p['dbname']}"
