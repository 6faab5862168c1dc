"""The loop is read and tested through its contracts: importing it loads no database or Kafka
client (relay.model holds the Store and Sink contracts)."""

import subprocess
import sys


def test_the_loop_imports_neither_psycopg_nor_confluent_kafka():
    code = (
        "import sys, relay.relay; "
        "print(sorted(m for m in ('psycopg', 'confluent_kafka') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert out == "[]"
