"""docker/compose.yaml, docker/Dockerfile and .dockerignore, held to the code: no Docker engine
runs in CI, so nothing else would notice a setting renamed in the code but not in the compose
file, a relay that runs as the tables' owner, or a build context that carries .venv.

The settings a command reads are found in the code itself: the envvars of its click options,
and for `outbox relay` the fields RelayConfig.from_env reads as OUTBOX_<FIELD> (its values are
loaded through from_env too, so a value the relay would refuse fails here).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import fields
from pathlib import Path

import click
import psycopg
import pytest
import yaml

from relay.cli import main
from relay.config import ENV_PREFIX, KAFKA_ENV_PREFIX, RelayConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text("utf-8"))["services"]


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, one per line (continuations joined, comments dropped)."""
    text = (DOCKER / "Dockerfile").read_text("utf-8").replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def instruction(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile() if line.split()[0] == name]


def image_default_command() -> list[str]:
    (cmd,) = instruction("CMD")
    return json.loads(cmd)


def init_script_commands() -> list[str]:
    """The `outbox` subcommands docker/init_db.py runs (with the environment it was given)."""
    return re.findall(r'outbox\("(\w+)"', (DOCKER / "init_db.py").read_text("utf-8"))


def command_of(name: str, service: dict) -> list[click.Command]:
    """The `outbox` commands a service of our image runs: its command (or the image's CMD),
    or, for the init script, the commands that script runs."""
    if service.get("entrypoint"):
        assert service["entrypoint"] == ["python", "/opt/outbox/init_db.py"], name
        return [main.commands[c] for c in init_script_commands()]
    args = service.get("command") or image_default_command()
    command = main.commands[args[0]]
    if isinstance(command, click.Group):
        command = command.commands[args[1]]
    return [command]


def settings_read_by(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if envvar:
            names.update([envvar] if isinstance(envvar, str) else envvar)
    if command is main.commands["relay"]:
        names.update(ENV_PREFIX + f.name.upper() for f in fields(RelayConfig) if f.name != "kafka")
    return names


def our_services(services: dict) -> dict[str, dict]:
    """The services built from our Dockerfile."""
    return {name: s for name, s in services.items() if "build" in s}


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_every_outbox_variable_set_is_one_the_command_reads(services):
    ours = our_services(services)
    assert {"migrate", "topics", "relay"} <= set(ours)
    for name, service in ours.items():
        commands = command_of(name, service)
        readable = set().union(*(settings_read_by(c) for c in commands))
        relay_reads_kafka = main.commands["relay"] in commands
        for variable in env_of(service):
            if not variable.startswith(ENV_PREFIX):
                continue
            if relay_reads_kafka and variable.startswith(KAFKA_ENV_PREFIX):
                continue  # librdkafka settings, passed through by RelayConfig.from_env
            assert variable in readable, (
                f"service {name} sets {variable}, which `outbox "
                f"{' / '.join(c.name or '' for c in commands)}` does not read"
            )


def test_the_relay_configuration_loads_as_set(services):
    env = env_of(services["relay"])
    cfg = RelayConfig.from_env(env)  # validates: a value the relay refuses fails here
    for variable, value in env.items():
        if variable.startswith(ENV_PREFIX) and not variable.startswith(KAFKA_ENV_PREFIX):
            field = variable[len(ENV_PREFIX) :].lower()
            assert str(getattr(cfg, field)) == value, variable


def dsn_parts(dsn: str) -> dict[str, str]:
    return psycopg.conninfo.conninfo_to_dict(dsn)  # type: ignore[return-value]


def test_the_relay_runs_as_the_least_privilege_role_the_migrate_step_makes(services):
    migrate = env_of(services["migrate"])
    owner = dsn_parts(migrate["OUTBOX_DSN"])["user"]
    assert owner == env_of(services["postgres"])["POSTGRES_USER"]
    assert [c.name for c in command_of("migrate", services["migrate"])] == ["migrate", "grants"]
    role, password = migrate["RELAY_DB_ROLE"], migrate["RELAY_DB_PASSWORD"]
    for name in ("relay", "topics"):
        parts = dsn_parts(env_of(services[name])["OUTBOX_DSN"])
        assert parts["user"] == role != owner, f"{name} does not connect as the relay's role"
        assert parts["password"] == password, f"{name}'s password is not the role's"


def test_the_topics_are_created_after_migrate_and_before_the_relay(services):
    def after(name: str) -> dict[str, str]:
        return {k: v["condition"] for k, v in services[name]["depends_on"].items()}

    assert after("relay")["topics"] == "service_completed_successfully"
    assert after("relay")["kafka"] == "service_healthy"
    assert after("topics") == {
        "migrate": "service_completed_successfully",
        "kafka": "service_healthy",
    }
    assert after("migrate")["postgres"] == "service_healthy"
    args = services["topics"]["command"]
    assert args[:2] == ["topics", "create"] and "--topic" in args
    # The options it passes are the command's: click parses them without error.
    main.commands["topics"].commands["create"].make_context("create", list(args[2:]))


def listeners(value: str) -> dict[str, str]:
    """NAME://host:port,... as {NAME: host:port}."""
    return dict(item.split("://", 1) for item in value.split(","))


def test_kafka_is_reachable_from_the_host_and_from_the_containers(services):
    kafka = env_of(services["kafka"])
    bound, advertised = (
        listeners(kafka["KAFKA_LISTENERS"]),
        listeners(kafka["KAFKA_ADVERTISED_LISTENERS"]),
    )
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(bound) <= set(protocols)
    host = [name for name, address in advertised.items() if address.startswith("127.0.0.1:")]
    assert len(host) == 1, "no listener advertised as 127.0.0.1:<port> for the host"
    port = advertised[host[0]].rsplit(":", 1)[1]
    assert bound[host[0]].rsplit(":", 1)[1] == port
    assert f"127.0.0.1:{port}:{port}" in services["kafka"]["ports"], "host listener not published"
    internal = [address for address in advertised.values() if address.startswith("kafka:")]
    assert internal == ["kafka:9092"]
    for name in ("relay", "topics"):
        assert env_of(services[name])["OUTBOX_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] in bound


def test_the_image_runs_outbox_as_a_numeric_non_root_user():
    (user,) = instruction("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: not a numeric non-root user"
    assert json.loads(instruction("ENTRYPOINT")[0]) == ["outbox"]
    assert image_default_command() == ["relay"]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's PATTERNS keep PATH (relative to the context) out of the build,
    for the patterns this repository uses (no ! exceptions)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1], bare):
                return True
    return False


def test_dockerignore_keeps_out_local_state_and_keeps_what_the_image_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "ignored() does not handle exceptions"
    for local in (".venv", ".services", ".git", "relay/__pycache__", "bench/results"):
        assert ignored(local + "/x", patterns), f"{local} would be sent to the Docker daemon"
    copied = [
        source
        for args in instruction("COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert {"outbox", "relay", "docker/init_db.py"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not ignored(source, patterns), f".dockerignore excludes {source}, which is copied"
