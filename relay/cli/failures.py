"""How a command fails: one line for the operator, never a traceback nor a password, and an
exit code. The database connection and the operator's confirmation fail that way too."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator

import click
import psycopg

from outbox.errors import OutboxError

from ..config import (
    ConfigError,
    RelayConfig,
    check_dsn,
    first_line,
    redact_dsn,
    redact_text,
    secrets_of,
)
from ..selection import SelectionError

EXIT_OK, EXIT_CONDITION, EXIT_USAGE = 0, 1, 2


class Failure(Exception):
    """An expected failure: one line for the operator, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_CONDITION):
        super().__init__(message)
        self.code = code


def expected_failures(func):
    """Turn the failures an operator can meet into one clean line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        dsn = kwargs.get("dsn") or ""
        secrets = secrets_of(RelayConfig(dsn=dsn)) if dsn else []
        try:
            return func(*args, **kwargs)
        except Failure as exc:
            message, code = str(exc), exc.code
        except SelectionError as exc:
            message, code = str(exc), EXIT_USAGE
        except ConfigError as exc:
            message, code = f"invalid configuration: {exc}", EXIT_USAGE
        except (OutboxError, psycopg.Error) as exc:
            message, code = first_line(exc), EXIT_CONDITION
        click.echo(f"error: {redact_text(message, *secrets)}", err=True)
        sys.exit(code)

    return wrapper


@contextlib.contextmanager
def kafka_failures(cfg: RelayConfig, unreachable: int = EXIT_CONDITION) -> Iterator[None]:
    """A Kafka setting librdkafka refuses: a usage error (exit 2); a cluster that cannot be
    reached or refuses: one line, exit UNREACHABLE. Either way with the -X secrets masked
    (expected_failures knows only the DSN's)."""
    try:
        yield
    except ConfigError as exc:
        message, code = f"invalid configuration: {first_line(exc)}", EXIT_USAGE
    except OutboxError as exc:
        message, code = first_line(exc), unreachable
    else:
        return
    raise Failure(redact_text(message, *secrets_of(cfg)), code) from None


def connect(dsn: str) -> psycopg.Connection:
    try:
        check_dsn(dsn)
    except ConfigError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None
    try:
        return psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name="outbox-cli"
        )
    except psycopg.Error as exc:
        raise Failure(f"cannot connect to {redact_dsn(dsn)}: {first_line(exc)}") from None


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise Failure("not a terminal: add --yes to confirm", EXIT_USAGE)
    if not click.confirm(question, default=False, err=True):
        raise Failure("nothing done", EXIT_CONDITION)
