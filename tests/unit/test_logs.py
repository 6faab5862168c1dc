import json
import logging

from relay.logs import configure_logging


def test_json_lines_and_secrets_scrubbed(capsys):
    configure_logging("INFO", json_lines=True, secrets=["hunter22", "kafka-pw"])
    try:
        logging.getLogger("relay.test").warning(
            "connect failed for %s with %s", "hunter22", "sasl.password=kafka-pw"
        )
        line = capsys.readouterr().err.strip()
        entry = json.loads(line)
        assert entry["level"] == "warning" and entry["logger"] == "relay.test"
        assert "hunter22" not in line and "kafka-pw" not in line
        assert entry["msg"] == "connect failed for *** with sasl.password=***"
    finally:
        logging.getLogger().handlers[:] = []
