"""`outbox topics check` and `outbox topics create`, as an operator runs them, against the real
PostgreSQL and Kafka."""

import json
import time
import uuid

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

import outbox
from relay.kafka import check_kafka
from tests.conftest import SERVICES, unavailable
from tests.kafka_helpers import delete_topic
from tests.outbox_command import run

#: The command must give up on an unreachable broker within this (it asks for 10 s).
UNREACHABLE_DEADLINE = 15.0


def one_error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def partitions(bootstrap, names):
    """Each of NAMES that the cluster has, with its partition count."""
    found = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return {t: len(found[t].partitions) for t in names if t in found}


@pytest.fixture
def new_topics(bootstrap):
    """Names of topics no one has created; whatever the test created is deleted after it."""
    made: list[str] = []

    def name() -> str:
        made.append(f"t.{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield name
    for t in made:
        delete_topic(bootstrap, t)


def test_check_then_create_then_check_and_create_again(dsn, bootstrap, new_topics):
    pending, failed, delivered = new_topics(), new_topics(), new_topics()
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=pending, key="k", payload={"n": 1})
        outbox.publish(conn, topic=pending, key="k", payload={"n": 2})
        gone = outbox.publish(conn, topic=failed, key="k", payload={"n": 3})
        done = outbox.publish(conn, topic=delivered, key="k", payload={"n": 4})
        conn.execute("UPDATE local_message SET status = 'FAILED' WHERE id = %s", (gone.id,))
        conn.execute("UPDATE local_message SET status = 'CONFIRMED' WHERE id = %s", (done.id,))
    env = {"OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap}
    first, second = sorted([pending, failed])

    check = run("topics", "check", env=env)
    assert check.returncode == 1, check.stderr
    assert f"{pending}: missing (2 rows to deliver)" in check.stdout
    assert f"{failed}: missing (1 rows to deliver)" in check.stdout
    assert delivered not in check.stdout, "a delivered row's topic is not needed"
    assert one_error_line(check) == (
        f"error: 2 of 2 topics missing: {first}, {second} (create them: outbox topics create)"
    )
    as_json = run("topics", "check", "--json", env=env)
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["missing"] == [first, second]
    assert {t["name"]: t["rows"] for t in report["topics"]} == {pending: 2, failed: 1}

    dry = run("topics", "create", "--partitions", "3", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"{pending}: would create, 3 partitions" in dry.stdout
    assert "dry run: nothing created" in dry.stdout
    assert partitions(bootstrap, [pending, failed]) == {}, "--dry-run created a topic"

    created = run("topics", "create", "--partitions", "3", env=env)
    assert created.returncode == 0, created.stderr
    assert f"{pending}: created, 3 partitions, replication factor 1" in created.stdout
    assert f"{failed}: created, 3 partitions, replication factor 1" in created.stdout
    assert partitions(bootstrap, [pending, failed, delivered]) == {pending: 3, failed: 3}

    assert run("topics", "check", env=env).returncode == 0

    again = run("topics", "create", "--partitions", "6", env=env)
    assert again.returncode == 0, again.stderr
    assert f"{pending}: present, 3 partitions" in again.stdout
    assert "fewer than the 6 asked: not changed" in again.stdout
    assert "created" not in again.stdout
    assert partitions(bootstrap, [pending, failed]) == {pending: 3, failed: 3}


def test_a_topic_named_before_any_row_exists(bootstrap, new_topics):
    """--no-table: no database at all, only the names given."""
    name = new_topics()
    env = {"OUTBOX_DSN": "", "OUTBOX_BOOTSTRAP_SERVERS": bootstrap}
    assert run("topics", "check", "--no-table", "--topic", name, env=env).returncode == 1
    created = run("topics", "create", "--no-table", "--topic", name, "--partitions", "2", env=env)
    assert created.returncode == 0, created.stderr
    assert f"{name}: created, 2 partitions" in created.stdout
    assert partitions(bootstrap, [name]) == {name: 2}
    assert run("topics", "check", "--no-table", "--topic", name, env=env).returncode == 0


def test_nothing_to_deliver_and_no_names_is_not_a_failure(dsn, bootstrap):
    env = {"OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap}
    for command in ("check", "create"):
        result = run("topics", command, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("no topics: no row to deliver names one")


def test_a_creation_the_cluster_refuses_is_one_line(dsn, bootstrap, new_topics):
    """The test cluster has one broker: three replicas cannot be placed."""
    name = new_topics()
    env = {"OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap}
    for extra in (["--dry-run"], []):
        result = run(
            "topics", "create", "--topic", name, "--replication-factor", "3", *extra, env=env
        )
        assert result.returncode == 1, result.stderr
        assert f"{name}: not created: INVALID_REPLICATION_FACTOR" in result.stdout
        assert one_error_line(result).startswith(
            f"error: 1 of 1 topics not created: {name}: INVALID_REPLICATION_FACTOR"
        )
    assert partitions(bootstrap, [name]) == {}


def test_doctor_advises_topics_create_and_it_fixes_the_finding(dsn, bootstrap, new_topics):
    name, failed_only = new_topics(), new_topics()
    with psycopg.connect(dsn) as conn, conn.transaction():
        outbox.publish(conn, topic=name, key="k", payload={})
        gone = outbox.publish(conn, topic=failed_only, key="k", payload={}).id
        # A FAILED row is still to deliver (by a replay): its topic is checked too.
        conn.execute("UPDATE local_message SET status = 'FAILED' WHERE id = %s", (gone,))
    env = {"OUTBOX_DSN": dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap}

    def topics_finding():
        return {f["check"]: f for f in json.loads(run("doctor", "--json", env=env).stdout)}[
            "topics"
        ]

    before = topics_finding()
    assert before["level"] == "fail" and name in before["message"]
    assert failed_only in before["message"] and "2 undelivered rows" in before["message"]
    assert before["advice"].startswith("create them: outbox topics create")
    assert run("topics", "create", env=env).returncode == 0
    assert topics_finding()["level"] == "ok"


@pytest.mark.parametrize("command", ["check", "create"])
def test_unreachable_bootstrap_is_one_line_within_the_deadline(dsn, command):
    env = {"OUTBOX_DSN": dsn}
    start = time.monotonic()
    result = run("topics", command, "-b", "127.0.0.1:1", "--topic", "payments", env=env)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr
    assert one_error_line(result).startswith("error: Kafka at 127.0.0.1:1 is not reachable")
    assert elapsed < UNREACHABLE_DEADLINE, f"took {elapsed:.1f}s"


def test_bad_input_is_one_line_without_a_password(empty_dsn, bootstrap):
    bad_dsn = "postgresql://outbox:wr0ngpass@127.0.0.1:1/none"
    cases = [
        # (arguments, environment, exit code, start of the error line)
        (
            ["check"],
            {"OUTBOX_DSN": bad_dsn},
            1,
            "error: cannot connect to postgresql://outbox:***@",
        ),
        (
            ["create"],
            {"OUTBOX_DSN": bad_dsn},
            1,
            "error: cannot connect to postgresql://outbox:***@",
        ),
        (["check"], {"OUTBOX_DSN": empty_dsn}, 1, "error: the outbox tables are missing"),
        (["check"], {"OUTBOX_DSN": ""}, 2, "error: no database: set --dsn or OUTBOX_DSN"),
        (["check", "--no-table"], {"OUTBOX_DSN": ""}, 2, "error: --no-table needs"),
        (
            ["create", "--topic", "bad name"],
            {"OUTBOX_DSN": bad_dsn},
            2,
            "error: invalid topic name 'bad name'",
        ),
        (["create", "--partitions", "0"], {"OUTBOX_DSN": bad_dsn}, 2, "error: --partitions must"),
        (
            ["create", "--replication-factor", "0"],
            {"OUTBOX_DSN": bad_dsn},
            2,
            "error: --replication-factor must",
        ),
        (
            ["check", "--topic", "x"],
            {"OUTBOX_DSN": empty_dsn, "OUTBOX_BOOTSTRAP_SERVERS": ""},
            2,
            "error: invalid configuration: no Kafka",
        ),
    ]
    for args, env, code, start in cases:
        result = run("topics", *args, env={"OUTBOX_BOOTSTRAP_SERVERS": bootstrap, **env})
        assert result.returncode == code, (args, result.stderr)
        assert one_error_line(result).startswith(start), (args, result.stderr)
        assert "wr0ngpass" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["check", "create"])
def test_a_kafka_setting_librdkafka_refuses_is_a_configuration_error(bootstrap, command):
    for args in (
        ["-X", "security.protocol=bogus"],
        ["-X", "security.protocol=ssl", "-X", "ssl.ca.location=/nonexistent"],
        ["-X", "sasl.password=s3cret-kafka-pw", "-X", "security.protocol=s3cret-kafka-pw"],
    ):
        result = run("topics", command, "--no-table", "--topic", "payments", "-b", bootstrap, *args)
        assert result.returncode == 2, (args, result.stderr)
        line = one_error_line(result)
        assert line.startswith("error: invalid configuration: Kafka settings refused"), line
        assert "s3cret-kafka-pw" not in result.stdout + result.stderr


def test_kafka_credentials_come_from_outbox_kafka_variables_and_are_never_printed(
    bootstrap, new_topics
):
    """As the relay reads them: OUTBOX_KAFKA_SASL_PASSWORD is sasl.password. A wrong password
    is one line without it."""
    servers = SERVICES.get("OUTBOX_TEST_SASL_BOOTSTRAP", "")
    user = SERVICES.get("OUTBOX_TEST_SASL_USERNAME", "")
    password = SERVICES.get("OUTBOX_TEST_SASL_PASSWORD", "")
    sasl = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanisms": "PLAIN"}
    if not servers or check_kafka(
        {"bootstrap.servers": servers, **sasl, "sasl.username": user, "sasl.password": password}
    ):
        unavailable("Kafka's SASL listener", "restart Kafka with scripts/services")
    name = new_topics()

    def env(secret):
        return {
            "OUTBOX_DSN": "",
            "OUTBOX_BOOTSTRAP_SERVERS": servers,
            "OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "OUTBOX_KAFKA_SASL_MECHANISMS": "PLAIN",
            "OUTBOX_KAFKA_SASL_USERNAME": user,
            "OUTBOX_KAFKA_SASL_PASSWORD": secret,
        }

    created = run("topics", "create", "--no-table", "--topic", name, env=env(password))
    assert created.returncode == 0, created.stderr
    assert f"{name}: created" in created.stdout
    assert partitions(bootstrap, [name]), "not created"

    wrong = "not-the-pw-93kq"
    start = time.monotonic()
    refused = run("topics", "check", "--no-table", "--topic", name, env=env(wrong))
    assert time.monotonic() - start < UNREACHABLE_DEADLINE
    assert refused.returncode == 1
    assert one_error_line(refused).startswith(f"error: Kafka at {servers}")
    assert wrong not in refused.stdout + refused.stderr
