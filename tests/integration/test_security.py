"""Credentials: the relay authenticates with SASL, says clearly when it cannot, and no password
or SASL secret ever appears in its logs or errors."""

import json
import urllib.request

import psycopg
import pytest

import outbox
from relay.kafka import check_kafka
from tests.conftest import SERVICES, unavailable
from tests.relay_process import RelayProcess, all_confirmed, wait_for
from tests.verify import verify


@pytest.fixture(scope="session")
def sasl(bootstrap):
    servers = SERVICES.get("OUTBOX_TEST_SASL_BOOTSTRAP", "")
    user = SERVICES.get("OUTBOX_TEST_SASL_USERNAME", "")
    password = SERVICES.get("OUTBOX_TEST_SASL_PASSWORD", "")
    config = {
        "bootstrap.servers": servers,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanisms": "PLAIN",
        "sasl.username": user,
        "sasl.password": password,
    }
    if not servers or check_kafka(config, timeout=5):
        unavailable("Kafka's SASL listener", "restart Kafka with scripts/services")
    return servers, user, password


def sasl_env(servers, user, password, **extra):
    return {
        "OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "OUTBOX_KAFKA_SASL_MECHANISMS": "PLAIN",
        "OUTBOX_KAFKA_SASL_USERNAME": user,
        "OUTBOX_KAFKA_SASL_PASSWORD": password,
        "OUTBOX_LOG_JSON": "true",
        "OUTBOX_LOG_LEVEL": "DEBUG",
        **extra,
    }


def db_password(dsn):
    return psycopg.conninfo.conninfo_to_dict(dsn)["password"]


def test_relay_with_sasl_delivers_and_never_logs_a_secret(dsn, topic, tmp_path, sasl, bootstrap):
    servers, user, password = sasl
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish_many(
            conn, [dict(topic=topic, key=f"k{i}", payload={"i": i}) for i in range(50)]
        )
    relay = RelayProcess(
        "sasl",
        dsn,
        servers,
        tmp_path,
        **sasl_env(servers, user, password, OUTBOX_METRICS_PORT="19492"),
    )
    try:
        wait_for(lambda: all_confirmed(dsn, 50), 60, "delivery over SASL")
        metrics = urllib.request.urlopen("http://127.0.0.1:19492/metrics", timeout=5).read()
        ready = urllib.request.urlopen("http://127.0.0.1:19492/readyz", timeout=10).read()
        assert relay.stop() == 0
    finally:
        if relay.alive():
            relay.kill()
    log = relay.log()
    assert "'sasl.password': '***'" in log, "the configuration is logged, redacted"
    for secret in (password, db_password(dsn)):
        assert secret not in log and secret.encode() not in metrics + ready
    for line in log.splitlines():
        json.loads(line)  # every line is one JSON object
    verify(dsn, bootstrap, topic).assert_clean()


def test_wrong_sasl_password_is_a_clear_outage_and_never_echoed(dsn, tmp_path, sasl):
    servers, user, _ = sasl
    wrong = "wrong-sasl-pw-5d2"
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic="t", key="k", payload={})
    relay = RelayProcess(
        "badsasl",
        dsn,
        servers,
        tmp_path,
        **sasl_env(servers, user, wrong, OUTBOX_METRICS_PORT="19493"),
    )
    try:
        wait_for(
            lambda: (
                "Authentication failed" in relay.log() or "SASL authentication error" in relay.log()
            ),
            60,
            "the authentication error",
        )
        body = json.loads(_get("http://127.0.0.1:19493/readyz"))
        assert body["status"] == "not ready" and body["checks"]["kafka"] != "ok"
        assert relay.stop() == 0
    finally:
        if relay.alive():
            relay.kill()
    log = relay.log()
    assert wrong not in log and db_password(dsn) not in log
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT status, attempts FROM local_message").fetchone() == ("PENDING", 0)


def _get(url):
    try:
        return urllib.request.urlopen(url, timeout=10).read()
    except urllib.error.HTTPError as exc:
        return exc.read()
