"""Named SQL blocks, read once from the package's .sql files, and the schema itself.

A block starts with a line ``-- name: NAME``; ``{table}`` and the other ``{...}`` names in it
are identifiers, filled in (quoted) by psycopg.sql for the configured schema.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import TypeVar

import psycopg
from psycopg import sql

from .errors import OutboxError

_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.M)
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")

TABLE = "local_message"

_Row = TypeVar("_Row")


@functools.cache
def read_blocks(package: str, filename: str) -> dict[str, str]:
    """The file's blocks by name, their whole-line comments left out: they are for the reader,
    and a `{name}` in one would otherwise be filled in like the block's own."""
    text = resources.files(package).joinpath(filename).read_text("utf-8")
    parts = _NAME_RE.split(text)
    return {
        name: "\n".join(
            line for line in body.strip().splitlines() if not line.lstrip().startswith("--")
        )
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def one_row(cur: psycopg.Cursor[_Row]) -> _Row:
    """The row of a query that always returns exactly one (an aggregate without GROUP BY, SHOW,
    an INSERT ... ON CONFLICT DO UPDATE RETURNING): fetchone() without its None."""
    row = cur.fetchone()
    assert row is not None, "a query that always returns one row returned none"
    return row


def schema_sql() -> str:
    """The one DDL source, schema.sql, as shipped inside the installed package."""
    return resources.files("outbox").joinpath("schema.sql").read_text("utf-8")


def validate_identifier(name: str, what: str = "schema") -> str:
    if not isinstance(name, str) or not _IDENT_RE.fullmatch(name):
        raise OutboxError(
            f"invalid {what} name {name!r}: use letters, digits, _ and $ "
            "(at most 63 characters, not starting with a digit)"
        )
    return name


def table_ident(schema: str | None, table: str = TABLE) -> sql.Identifier:
    if schema is None:
        return sql.Identifier(table)
    return sql.Identifier(validate_identifier(schema), table)


@functools.cache
def query(package: str, filename: str, name: str, schema: str | None) -> sql.Composed:
    """The block NAME with its identifiers quoted for SCHEMA (None: the search_path), and each
    other block of the file that it names as {BLOCK} put in its place: one rule written once
    and used by several queries."""
    body = read_blocks(package, filename)[name]
    return compose(body, schema, **named_blocks(package, filename, name, schema))


def named_blocks(
    package: str, filename: str, name: str, schema: str | None
) -> dict[str, sql.Composed]:
    """The other blocks of the file that block NAME names as {BLOCK}, ready for compose()."""
    blocks = read_blocks(package, filename)
    # In parentheses of their own: whatever an included block ends with, it cannot run into
    # what follows it where it is named.
    return {
        other: sql.SQL("(") + query(package, filename, other, schema) + sql.SQL("\n)")
        for other in blocks
        if other != name and "{" + other + "}" in blocks[name]
    }


def compose(body: str, schema: str | None, **fragments: sql.Composable) -> sql.Composed:
    """BODY with {table} and the other table names quoted for SCHEMA, and FRAGMENTS (already
    safe SQL, such as an operator's selection) put in their places."""
    idents = {
        "table": table_ident(schema),
        "bucket_table": table_ident(schema, "local_message_bucket"),
        "relay_table": table_ident(schema, "local_message_relay"),
        "schema_table": table_ident(schema, "local_message_schema"),
        "audit_table": table_ident(schema, "local_message_audit"),
        "inbox_table": table_ident(schema, "inbox_message"),
        "tenant_table": table_ident(schema, "local_message_tenant"),
        "rate_table": table_ident(schema, "local_message_rate"),
    }
    return sql.SQL(body).format(**idents, **fragments)
