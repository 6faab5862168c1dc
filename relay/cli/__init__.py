"""The `outbox` command: what operators run.

Exit codes: 0 ok, 1 a check or condition failed (or an expected failure such as an unreachable
database), 2 usage or configuration error. Expected failures print one line, never a traceback,
and never a password.

A module per command group, each left to parsing options and rendering results; what the
commands do to rows is in the modules of relay/ (operations, status, topics, reconcile ...).
"""

from __future__ import annotations

import click

from . import audit, changes, inbox, reconcile, run, setup, topics, views


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="outbox-relay", message="outbox-relay %(version)s")
def main() -> None:
    """Transactional outbox for PostgreSQL, delivered to Kafka.

    \b
    Every command reads OUTBOX_DSN and OUTBOX_SCHEMA (or --dsn, --schema).
    Exit codes: 0 ok, 1 a check or condition failed, 2 usage or configuration error.

    \b
    Examples:
      outbox migrate                       create or upgrade the tables
      outbox relay -b kafka:9092           deliver pending events to Kafka
      outbox status                        counts, lag, blocked keys, relays
      outbox list --status FAILED          what is stuck, and why
      outbox show 1234                     one message, whole
      outbox replay 1234 --yes             send it again
      outbox doctor -b kafka:9092          check the set-up, with advice
      outbox inbox purge --older-than 7d   delete consumers' old inbox rows
    """


for _command in (
    setup.migrate,
    setup.grants,
    setup.doctor,
    topics.topics,
    views.status,
    views.list_command,
    views.show,
    changes.replay,
    changes.skip,
    changes.purge,
    reconcile.reconcile,
    inbox.inbox,
    audit.audit,
    run.relay,
):
    main.add_command(_command)

__all__ = ["main"]
