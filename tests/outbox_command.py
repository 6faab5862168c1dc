"""`outbox` as an operator types it: a real process, its output and exit status."""

from __future__ import annotations

import os
import subprocess
import sys


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """`python -m relay ARGS` (the `outbox` command) with ENV added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
