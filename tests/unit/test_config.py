import pytest

from relay.config import ConfigError, RelayConfig, redact_dsn, secrets_of

BASE = {"OUTBOX_DSN": "postgresql://u:pw@db/app", "OUTBOX_BOOTSTRAP_SERVERS": "k:9092"}


def test_environment_variables_and_kafka_passthrough():
    cfg = RelayConfig.from_env(
        {
            **BASE,
            "OUTBOX_BATCH_SIZE": "500",
            "OUTBOX_LISTEN": "false",
            "OUTBOX_KAFKA_SASL_USERNAME": "relay",
            "OUTBOX_KAFKA_LINGER_MS": "2",
        }
    )
    assert cfg.batch_size == 500 and cfg.listen is False
    assert cfg.kafka == {"sasl.username": "relay", "linger.ms": "2"}
    assert cfg.producer_config()["bootstrap.servers"] == "k:9092"


def test_overrides_beat_the_environment():
    cfg = RelayConfig.from_env({**BASE, "OUTBOX_BATCH_SIZE": "500"}, batch_size=7, name=None)
    assert cfg.batch_size == 7


@pytest.mark.parametrize(
    "env, message",
    [
        ({"OUTBOX_DSN": ""}, "no database"),
        ({"OUTBOX_BOOTSTRAP_SERVERS": ""}, "no Kafka"),
        ({"OUTBOX_BATCH_SIZE": "many"}, "OUTBOX_BATCH_SIZE='many' is not a valid int"),
        ({"OUTBOX_BATCH_SIZE": "0"}, "batch_size must be at least 1"),
        ({"OUTBOX_SCHEMA": "x; drop table y"}, "invalid schema name"),
        ({"OUTBOX_LEASE_SECONDS": "20"}, "lease_seconds"),
        ({"OUTBOX_KAFKA_MESSAGE_TIMEOUT_MS": "60000"}, "flush_timeout"),
        ({"OUTBOX_KAFKA_ACKS": "1"}, "acks=1 would give up delivery guarantees"),
        ({"OUTBOX_BACKOFF_MAX": "nan"}, "backoff_max must be a positive number of seconds"),
        ({"OUTBOX_BACKOFF_BASE": "inf"}, "backoff_base must be a positive number of seconds"),
    ],
)
def test_invalid_configuration_fails_with_one_clear_line(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        RelayConfig.from_env({**BASE, **env})
    assert "\n" not in str(info.value)


def test_describe_never_shows_secrets():
    cfg = RelayConfig.from_env(
        {
            **BASE,
            "OUTBOX_DSN": "postgresql://app:s3cret-pw@db:5432/app",
            "OUTBOX_KAFKA_SASL_PASSWORD": "kafka-secret",
            "OUTBOX_KAFKA_SASL_USERNAME": "relay",
        }
    )
    shown = repr(cfg.describe())
    assert "s3cret-pw" not in shown and "kafka-secret" not in shown
    assert "relay" in shown and "db:5432" in shown
    assert set(secrets_of(cfg)) == {"s3cret-pw", "kafka-secret"}


@pytest.mark.parametrize(
    "dsn, shown",
    [
        ("postgresql://app:pw1@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("host=db password=pw1 user=app", "host=db password=*** user=app"),
        ("host=db password='p w1' user=app", "host=db password=*** user=app"),
        (
            "postgresql://db/app?password=pw1&sslmode=require",
            "postgresql://db/app?password=***&sslmode=require",
        ),
        ("postgresql://db/app", "postgresql://db/app"),
    ],
)
def test_redact_dsn(dsn, shown):
    assert redact_dsn(dsn) == shown


def test_every_setting_is_documented_with_its_environment_variable():
    from dataclasses import fields
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for f in fields(RelayConfig):
        if f.name == "kafka":
            continue
        assert f"| {f.name} | `OUTBOX_{f.name.upper()}` |" in doc, f.name


def test_invalid_configuration_exits_2_with_one_line():
    from click.testing import CliRunner

    from relay.cli import main

    result = CliRunner().invoke(
        main,
        ["relay"],
        env={
            "OUTBOX_DSN": "postgresql://u:topsecret@127.0.0.1:1/x",
            "OUTBOX_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "OUTBOX_BATCH_SIZE": "-3",
        },
    )
    assert result.exit_code == 2
    assert result.output.strip() == "error: invalid configuration: batch_size must be at least 1"
    assert "topsecret" not in result.output


def test_exactly_once_refuses_a_batch_its_progress_record_cannot_hold():
    base = {"dsn": "postgresql://x", "bootstrap_servers": "k:9092", "delivery": "exactly-once"}
    RelayConfig.from_env({}, **base, batch_size=2000)
    with pytest.raises(ConfigError, match="too large for exactly-once delivery"):
        RelayConfig.from_env({}, **base, batch_size=30_000)
    with pytest.raises(ConfigError, match="too large for exactly-once delivery"):
        RelayConfig.from_env({}, **base, batch_size=2000, max_message_bytes=50_000)
    with pytest.raises(ConfigError, match="shards must divide 256"):
        RelayConfig.from_env({}, **base, shards=6)
    with pytest.raises(ConfigError, match="delivery must be one of"):
        RelayConfig.from_env({}, **{**base, "delivery": "exactly_once"})
