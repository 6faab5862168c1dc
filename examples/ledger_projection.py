"""The bank's ledger: a projection of the transfer events of examples/bank_transfer.py, kept
by a consumer that applies each event once, however often Kafka delivers it.

    python examples/bank_transfer.py setup             # accounts, outbox schema, topic
    python examples/ledger_projection.py setup         # the ledger, from the opening balances
    python examples/bank_transfer.py transfer 200      # (and `outbox relay` delivers the events)
    python examples/ledger_projection.py run --idle 5  # consume until 5 s pass without an event
    python examples/ledger_projection.py check         # the ledger against the accounts

AccountDebited and AccountCredited each write a ledger entry and move the account's projected
balance, in the same transaction as the inbox row of the event (outbox.consumer.InboxConsumer).
A copy of an event delivered again (the relay sent a row twice after a crash, an operator ran
`outbox replay`) finds its inbox row and is skipped, so `check` finds every projected balance
equal to the account's own. `run` stops on SIGTERM or Ctrl-C, after the event in hand.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import psycopg

from outbox.consumer import InboxConsumer

TOPIC = "bank.events"

LEDGER = """
DROP TABLE IF EXISTS ledger_entry, ledger_balance;
CREATE TABLE ledger_balance (
    account  integer        PRIMARY KEY,
    balance  numeric(12, 2) NOT NULL
);
-- No unique key on the event: a second application of an event would show as a second entry.
CREATE TABLE ledger_entry (
    id        bigint         GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account   integer        NOT NULL,
    amount    numeric(12, 2) NOT NULL,
    transfer  text           NOT NULL,
    kind      text           NOT NULL
);
-- The opening balances: the accounts as they are before the first transfer.
INSERT INTO ledger_balance SELECT id, balance FROM account;
"""


def apply_event(conn: psycopg.Connection, msg) -> None:
    """The handler: runs in the consumer's transaction, with the event's inbox row."""
    event = json.loads(msg.value())
    kind = event.get("type")
    if kind not in ("AccountDebited", "AccountCredited"):
        return  # TransferCompleted and any later kinds: nothing to project
    amount = event["amount"] if kind == "AccountCredited" else f"-{event['amount']}"
    conn.execute(
        "INSERT INTO ledger_entry (account, amount, transfer, kind) VALUES (%s, %s, %s, %s)",
        (event["account"], amount, event["transfer"], kind),
    )
    conn.execute(
        "UPDATE ledger_balance SET balance = balance + %s WHERE account = %s",
        (amount, event["account"]),
    )


def cmd_setup(_args) -> None:
    with psycopg.connect(os.environ["OUTBOX_DSN"]) as conn:
        conn.execute(LEDGER)
    print("ledger set up from the opening balances")


def cmd_run(args) -> None:
    config = {
        "bootstrap.servers": os.environ["OUTBOX_BOOTSTRAP_SERVERS"],
        "group.id": args.group,
        "auto.offset.reset": "earliest",
    }
    consumer = InboxConsumer(
        config, [TOPIC], apply_event, connect=lambda: psycopg.connect(os.environ["OUTBOX_DSN"])
    )
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop())
    signal.signal(signal.SIGINT, lambda *_: consumer.stop())
    processed = skipped = 0
    last = time.monotonic()
    try:
        # run() would do; this loop also stops once the topic has been quiet for --idle.
        while not consumer.stopped and time.monotonic() - last < args.idle:
            handled = consumer.poll_once(0.5)
            if handled is None:
                continue
            last = time.monotonic()
            processed += handled.new
            skipped += not handled.new
    finally:
        consumer.close()
    print(f"{processed} events processed, {skipped} copies skipped (processed before)")


def cmd_check(_args) -> None:
    with psycopg.connect(os.environ["OUTBOX_DSN"]) as conn:
        wrong = conn.execute(
            "SELECT a.id, a.balance, l.balance FROM account a "
            "JOIN ledger_balance l ON l.account = a.id "
            "WHERE a.balance <> l.balance ORDER BY a.id"
        ).fetchall()
        (entries,) = conn.execute("SELECT count(*) FROM ledger_entry").fetchone()
        (transfers,) = conn.execute("SELECT count(*) FROM transfer").fetchone()
    for account, balance, projected in wrong:
        print(f"  account {account}: balance {balance}, ledger says {projected}")
    print(
        f"{entries} ledger entries for {transfers} transfers; "
        f"{len(wrong)} accounts differ from the ledger"
    )
    if wrong or entries != 2 * transfers:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup").set_defaults(func=cmd_setup)
    p = sub.add_parser("run")
    p.add_argument("--group", default="ledger-projection", help="Kafka and inbox group")
    p.add_argument(
        "--idle",
        type=float,
        default=float("inf"),
        help="stop after this many seconds without an event [never]",
    )
    p.set_defaults(func=cmd_run)
    sub.add_parser("check").set_defaults(func=cmd_check)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
