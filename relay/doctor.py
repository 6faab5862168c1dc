"""`outbox doctor`: each check gives a finding with what to do about it."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from outbox.message import RECORD_BATCH_OVERHEAD
from outbox.schema import SCHEMA_VERSION, installed_version
from outbox.sql import one_row, query, validate_identifier

from .config import first_line
from .kafka import check_kafka, check_progress_topic, missing_topics, topic_limits

EXPECTED_INDEXES = (
    "local_message_pkey",
    "local_message_message_id_key",
    "local_message_tenant_dedup_key_key",
    "local_message_pending_group_idx",
    "local_message_blocking_idx",
    "local_message_scheduled_idx",
    "local_message_created_at_brin",
)
EXPECTED_AUTOVACUUM = ("autovacuum_vacuum_scale_factor", "autovacuum_vacuum_threshold")
OLD_TRANSACTION_SECONDS = 300


@dataclass
class Finding:
    check: str
    level: str  # ok, warn, fail
    message: str
    advice: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[self.level]
        return f"[{mark}] {self.check}: {self.message}" + (
            f"\n       -> {self.advice}" if self.advice else ""
        )

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "level": self.level,
            "message": self.message,
            "advice": self.advice,
        }


def run_checks(
    dsn: str,
    schema: str,
    kafka: dict[str, str],
    max_message_bytes: int | None = None,
    progress: tuple[str, int] | None = None,
) -> list[Finding]:
    """Every check; PROGRESS, (topic, shards) for exactly-once delivery, checks that topic."""
    out: list[Finding] = []
    validate_identifier(schema)
    try:
        conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name="outbox-doctor"
        )
    except psycopg.Error as exc:
        out.append(
            Finding(
                "postgresql",
                "fail",
                f"cannot connect: {first_line(exc)}",
                "check the DSN, the server, pg_hba.conf and the password",
            )
        )
        return out
    with conn:
        version = one_row(conn.execute(_q("server_version", schema)))[0]
        out.append(Finding("postgresql", "ok", f"connected, server {version}"))
        out.extend(_schema_checks(conn, schema))
        if out[-1].check == "schema" and out[-1].level == "fail":
            return out + _kafka_checks(kafka, {}, max_message_bytes, progress)
        out.extend(_table_checks(conn, schema))
        # Every row still to deliver (PENDING, FAILED, SENT), as `outbox topics` reads them.
        topics: dict[str, int] = dict(
            conn.execute(query("relay", "topics.sql", "undelivered_topics", schema))
        )
    return out + _kafka_checks(kafka, topics, max_message_bytes, progress)


def _q(name: str, schema: str):
    return query("relay", "doctor.sql", name, schema)


def _schema_checks(conn: psycopg.Connection, schema: str) -> list[Finding]:
    version = installed_version(conn, schema)
    if version is None:
        return [
            Finding(
                "schema",
                "fail",
                f"no outbox tables in schema {schema!r}",
                f"run: outbox migrate --schema {schema}",
            )
        ]
    if version != SCHEMA_VERSION:
        return [
            Finding(
                "schema",
                "fail",
                f"version {version}, this code needs {SCHEMA_VERSION}",
                f"run: outbox migrate --schema {schema}",
            )
        ]
    found = {r[0] for r in conn.execute(_q("indexes", schema), {"schema": schema})}
    missing = [i for i in EXPECTED_INDEXES if i not in found]
    out = [Finding("schema", "ok", f"version {version}")]
    if missing:
        out.append(
            Finding(
                "indexes",
                "fail",
                f"missing: {', '.join(missing)}",
                f"run: outbox migrate --schema {schema} (it recreates them)",
            )
        )
    else:
        out.append(Finding("indexes", "ok", f"all {len(EXPECTED_INDEXES)} present"))
    return out


def _table_checks(conn: psycopg.Connection, schema: str) -> list[Finding]:
    out = []
    (options,) = one_row(conn.execute(_q("table_options", schema), {"schema": schema}))
    have = {o.split("=")[0] for o in options}
    if all(o in have for o in EXPECTED_AUTOVACUUM):
        out.append(Finding("autovacuum", "ok", "queue settings on local_message"))
    else:
        out.append(
            Finding(
                "autovacuum",
                "warn",
                "local_message has default autovacuum settings",
                f"run: outbox migrate --schema {schema} on a fresh install, or "
                "ALTER TABLE local_message SET (autovacuum_vacuum_scale_factor = "
                "0.01, autovacuum_vacuum_threshold = 1000)",
            )
        )
    old = conn.execute(
        _q("old_transactions", schema), {"seconds": OLD_TRANSACTION_SECONDS}
    ).fetchall()
    if old:
        pid, user, state, age, query = old[0]
        out.append(
            Finding(
                "old transactions",
                "warn",
                f"{len(old)} transaction(s) open for over {OLD_TRANSACTION_SECONDS}s; oldest: pid "
                f"{pid} ({user}, {state}, {age}s): {query!r}",
                "they stop vacuum from removing delivered rows and the relay's read of pending "
                "rows slows down: end them (pg_terminate_backend) and set "
                "idle_in_transaction_session_timeout",
            )
        )
    else:
        out.append(
            Finding("old transactions", "ok", f"none open for over {OLD_TRANSACTION_SECONDS}s")
        )
    slots = conn.execute(_q("inactive_slots", schema)).fetchall()
    if slots:
        out.append(
            Finding(
                "replication slots",
                "warn",
                f"inactive slots hold WAL and the xmin horizon: {', '.join(s[0] for s in slots)}",
                "drop slots nobody reads: SELECT pg_drop_replication_slot('name')",
            )
        )
    live, dead = conn.execute(_q("dead_rows", schema), {"schema": schema}).fetchone() or (0, 0)
    if dead > 10_000 and dead > live * 0.2:
        out.append(
            Finding(
                "dead rows",
                "warn",
                f"{dead} dead rows for {live} live",
                "see the old transactions check; VACUUM (VERBOSE) local_message "
                "says what holds them",
            )
        )
    else:
        out.append(Finding("dead rows", "ok", f"{dead} dead rows for {live} live"))
    counts: dict[str, int] = dict(conn.execute(_q("counts_by_status", schema)).fetchall())
    if counts.get("FAILED"):
        out.append(
            Finding(
                "failed messages",
                "warn",
                f"{counts['FAILED']} FAILED rows block their keys",
                "outbox list --status FAILED; then outbox replay or outbox skip",
            )
        )
    else:
        out.append(Finding("failed messages", "ok", "none"))
    (alive,) = one_row(conn.execute(_q("relays_alive", schema)))
    if counts.get("PENDING") and not alive:
        out.append(
            Finding(
                "relays",
                "fail",
                f"{counts['PENDING']} PENDING rows and no relay alive",
                "start one: outbox relay",
            )
        )
    else:
        out.append(Finding("relays", "ok", f"{alive} alive"))
    return out


def _kafka_checks(
    kafka: dict[str, str],
    topics: dict[str, int],
    max_message_bytes: int | None,
    progress: tuple[str, int] | None = None,
) -> list[Finding]:
    if not kafka.get("bootstrap.servers"):
        return [
            Finding(
                "kafka",
                "warn",
                "not checked: no bootstrap servers given",
                "add -b HOST:PORT (or OUTBOX_BOOTSTRAP_SERVERS)",
            )
        ]
    problem = check_kafka(kafka, timeout=10)
    if problem:
        return [
            Finding(
                "kafka",
                "fail",
                f"not reachable: {problem}",
                "check bootstrap.servers, the listeners, and security.protocol/sasl.*",
            )
        ]
    out = [Finding("kafka", "ok", f"reachable at {kafka['bootstrap.servers']}")]
    missing = missing_topics(kafka, list(topics))
    if missing:
        out.append(
            Finding(
                "topics",
                "fail",
                f"{sum(topics[t] for t in missing)} undelivered rows for topics that do not "
                f"exist: {', '.join(missing)}",
                "create them: outbox topics create; PENDING rows then go out on their own, "
                "FAILED ones with outbox replay --status FAILED --error UNKNOWN_TOPIC --yes",
            )
        )
    else:
        out.append(Finding("topics", "ok", f"all {len(topics)} topics with undelivered rows exist"))
    if max_message_bytes:
        out.append(_size_check(kafka, [t for t in topics if t not in missing], max_message_bytes))
    if progress:
        out.append(_progress_check(kafka, *progress))
    return out


def _progress_check(kafka: dict[str, str], topic: str, shards: int) -> Finding:
    problem = check_progress_topic(kafka, topic, shards)
    if problem:  # it says how to fix it
        return Finding("progress topic", "fail", problem)
    return Finding(
        "progress topic", "ok", f"{topic}: {shards} partitions, compacted (exactly-once delivery)"
    )


def _size_check(kafka: dict[str, str], topics: list[str], max_message_bytes: int) -> Finding:
    """A record at the writer's limit, in a batch of its own, must fit every topic."""
    needed = max_message_bytes + RECORD_BATCH_OVERHEAD
    limits = topic_limits(kafka, topics)
    small = sorted(t for t, limit in limits.items() if limit < needed)
    if small:
        shown = ", ".join(f"{t} ({limits[t]})" for t in small[:10])
        return Finding(
            "message size",
            "warn",
            f"topics whose max.message.bytes is below {needed} (max_message_bytes "
            f"{max_message_bytes} + {RECORD_BATCH_OVERHEAD} of batch framing): "
            f"{shown}",
            "a message near the writer's limit would be refused by the broker and "
            "end FAILED: raise the topics' max.message.bytes, or lower "
            "max_message_bytes and publish()'s max_bytes together",
        )
    unread = len(topics) - len(limits)
    return Finding(
        "message size",
        "ok",
        f"{len(limits)} topics take records of max_message_bytes "
        f"({max_message_bytes})" + (f"; {unread} not readable" if unread else ""),
    )
