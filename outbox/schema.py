"""Install and check the outbox schema (schema.sql, shipped inside the package)."""

from __future__ import annotations

import psycopg
from psycopg import sql

from .errors import SchemaError
from .sql import schema_sql, validate_identifier

#: The version schema.sql installs.
SCHEMA_VERSION = 1


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
        conn.execute(schema_sql())
    return installed_version(conn, target)


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
