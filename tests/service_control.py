"""Stopping, killing and starting the local PostgreSQL and Kafka (scripts/services), for the
tests of the `services` tier (tests/outages, tests/chaos): run them alone, they disturb every
other test that uses the services meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.conftest import ROOT
from tests.kafka_helpers import check_kafka
from tests.relay_process import wait_for


def services(*args: str, timeout: float = 300) -> None:
    """scripts/services ARGS (up, down, restart; pg or kafka), bounded by TIMEOUT seconds."""
    subprocess.run(
        [str(ROOT / "scripts" / "services"), *args],
        check=True,
        timeout=timeout,
        capture_output=True,
    )


def broker_pid() -> int:
    return int((ROOT / ".services" / "kafka" / "kafka.pid").read_text())


def kill_broker() -> None:
    """kill -9 the broker, as a crash would; broker_back() starts it again."""
    pid = broker_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the broker gone")


def broker_back(bootstrap: str) -> None:
    services("up", "kafka")
    wait_for(lambda: check_kafka(bootstrap) is None, 60, "the broker back")
