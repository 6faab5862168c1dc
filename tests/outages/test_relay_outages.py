"""Outages of the real broker and of PostgreSQL while a relay runs: no attempts burned, no row
marked without an ack, delivery resumes by itself. These tests stop and start the shared
services, so they restart them in any case before they end."""

import json
import time
import urllib.request

import psycopg
import pytest

from tests.kafka_helpers import check_kafka
from tests.relay_process import all_confirmed, counts, wait_for, write
from tests.service_control import services
from tests.verify import verify

pytestmark = pytest.mark.services


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_broker_down_20s_burns_no_attempts_and_delivery_resumes(dsn, bootstrap, topic, relays):
    relay = relays("outage", OUTBOX_METRICS_PORT="19491")
    write(dsn, topic, 500, 20)
    wait_for(lambda: all_confirmed(dsn, 500), 60, "first 500 delivered")
    assert http_get("http://127.0.0.1:19491/readyz")[0] == 200
    services("down", "kafka")
    try:
        write(dsn, topic, 1000, 20, start=500)
        wait_for(lambda: "Kafka unreachable: pausing" in relay.log(), 40, "the circuit breaker")
        code, body = http_get("http://127.0.0.1:19491/readyz")
        assert code == 503 and json.loads(body)["checks"]["kafka"] != "ok"
        assert http_get("http://127.0.0.1:19491/healthz")[0] == 200, "alive, just waiting"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the outage lasts 20 s; the table must not move
            c = counts(dsn)
            assert c.get("CONFIRMED") == 500 and set(c) <= {"CONFIRMED", "PENDING"}
            time.sleep(1)
    finally:
        services("up", "kafka")
    wait_for(lambda: check_kafka(bootstrap) is None, 60, "the broker back")
    wait_for(lambda: all_confirmed(dsn, 1500), 120, "delivery resuming by itself")
    with psycopg.connect(dsn) as c:
        assert c.execute(
            "SELECT max(attempts), count(last_error) FROM local_message"
        ).fetchone() == (0, 0), "an outage is not the messages' fault"
    verify(dsn, bootstrap, topic).assert_clean()
    metrics = http_get("http://127.0.0.1:19491/metrics")[1]
    assert f'outbox_messages_published_total{{topic="{topic}"}}' in metrics
    assert relay.stop() == 0


def test_postgresql_restart_is_survived(dsn, bootstrap, topic, relays):
    relay = relays("pg-restart")
    write(dsn, topic, 500, 20)
    wait_for(lambda: all_confirmed(dsn, 500), 60, "first 500 delivered")
    try:
        services("restart", "pg")  # fast shutdown: the relay's connections are cut
    finally:
        services("up", "pg")
    write(dsn, topic, 500, 20, start=500)
    wait_for(lambda: all_confirmed(dsn, 1000), 120, "delivery after the restart")
    assert relay.alive()
    assert "relay iteration failed" in relay.log(), "the relay saw the restart"
    verify(dsn, bootstrap, topic).assert_clean()
    assert relay.stop() == 0
