"""Install, upgrade and check the outbox schema.

A database without the tables gets schema.sql, the whole current schema. A database at an
older version gets the migrations after its version, in order (outbox/migrations/NNNN_*.sql).
Both end in the same database: tests/integration/test_schema.py proves it for every version.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg
from psycopg import sql

from .errors import SchemaError
from .sql import schema_sql, validate_identifier

#: The version schema.sql installs.
SCHEMA_VERSION = 7

_MIGRATION_RE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


def migrations() -> dict[int, str]:
    """{version: SQL} of every migration shipped in the package."""
    found = {}
    for entry in resources.files("outbox").joinpath("migrations").iterdir():
        match = _MIGRATION_RE.fullmatch(entry.name)
        if match:
            found[int(match.group(1))] = entry.read_text("utf-8")
    return dict(sorted(found.items()))


def apply_schema(conn: psycopg.Connection, schema: str | None = None) -> int:
    """Create or upgrade the outbox tables in SCHEMA (default: public) in one transaction;
    return the version now installed. Safe to run again, and from several processes at once."""
    target = validate_identifier(schema or "public")
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(target)))
        # Two installers at once would race on CREATE ... IF NOT EXISTS; serialise them.
        conn.execute("SELECT pg_advisory_xact_lock(2828, hashtext(%s))", (target,))
        conn.execute(
            sql.SQL("SELECT set_config('search_path', {}, true)").format(
                sql.Literal(sql.Identifier(target).as_string(conn))
            )
        )
        version = installed_version(conn, target)
        if version is None:
            conn.execute(schema_sql())
        elif version > SCHEMA_VERSION:
            raise SchemaError(
                f"outbox schema {target!r} is at version {version}, newer than this code's "
                f"{SCHEMA_VERSION}: upgrade outbox-relay"
            )
        else:
            for number, body in migrations().items():
                if version < number <= SCHEMA_VERSION:
                    conn.execute(body)
    installed = installed_version(conn, target)
    if installed is None:  # schema.sql and every migration record their version
        raise SchemaError(f"outbox schema {target!r} records no version after the install")
    return installed


def installed_version(conn: psycopg.Connection, schema: str | None = None) -> int | None:
    """The schema version recorded in SCHEMA, or None when the outbox tables are missing."""
    target = validate_identifier(schema or "public")
    row = conn.execute(
        "SELECT to_regclass(format('%%I.local_message_schema', %s::text)) IS NOT NULL",
        (target,),
    ).fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute(
        sql.SQL("SELECT max(version) FROM {}").format(
            sql.Identifier(target, "local_message_schema")
        )
    ).fetchone()
    return row[0] if row else None


def require_schema(conn: psycopg.Connection, schema: str | None = None) -> None:
    version = installed_version(conn, schema)
    if version is None:
        raise SchemaError(
            f"the outbox tables are missing in schema {schema or 'public'!r}: run `outbox migrate`"
        )
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"outbox schema version {version} in {schema or 'public'!r}, this code needs "
            f"{SCHEMA_VERSION}: run `outbox migrate`"
        )
