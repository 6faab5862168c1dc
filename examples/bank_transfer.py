"""A small bank: transfers debit one account and credit another, and record
AccountDebited / AccountCredited / TransferCompleted events in the same transaction.

    python examples/bank_transfer.py setup              # tables, outbox schema, topic
    python examples/bank_transfer.py transfer 200       # 200 random transfers
    python examples/bank_transfer.py watch --expect N   # read the events back from Kafka

A transfer that would overdraw its account is refused: the business transaction rolls back and
takes its events with it, so Kafka never hears of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Numeric, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox
from outbox.sqlalchemy import HasEvents, install

TOPIC = "bank.events"
ACCOUNTS = 20


class Base(DeclarativeBase):
    pass


class Account(Base, HasEvents):
    __tablename__ = "account"
    __table_args__ = (CheckConstraint("balance >= 0", name="no_overdraft"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(80))
    balance: Mapped[Decimal] = mapped_column(Numeric(12, 2))


class Transfer(Base, HasEvents):
    __tablename__ = "transfer"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    from_account: Mapped[int] = mapped_column(ForeignKey("account.id"))
    to_account: Mapped[int] = mapped_column(ForeignKey("account.id"))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))


class InsufficientFunds(Exception):
    pass


# Every flush of every Session writes the events its entities recorded, in the same transaction.
# lock_key serialises writers of one account, so that each account's events are in commit order.
install(Session, lock_key=True)


def engine_url() -> str:
    dsn = os.environ["OUTBOX_DSN"]
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


def transfer(session: Session, source: int, target: int, amount: Decimal) -> str:
    """Move AMOUNT; the balances and the three events commit together or not at all."""
    transfer_id = str(uuid.uuid4())
    with session.begin():
        # Lock both rows in id order so that concurrent transfers cannot deadlock.
        accounts = {
            a.id: a
            for a in session.scalars(
                select(Account)
                .where(Account.id.in_([source, target]))
                .order_by(Account.id)
                .with_for_update()
            )
        }
        debit, credit = accounts[source], accounts[target]
        if debit.balance < amount:
            raise InsufficientFunds(f"account {source} has {debit.balance}, needs {amount}")
        debit.balance -= amount
        credit.balance += amount
        session.add(Transfer(id=transfer_id, from_account=source, to_account=target, amount=amount))
        debit.record_event(
            TOPIC,
            {
                "type": "AccountDebited",
                "account": source,
                "amount": str(amount),
                "transfer": transfer_id,
                "balance": str(debit.balance),
            },
            key=f"account-{source}",
            headers={"event-type": "AccountDebited"},
        )
        credit.record_event(
            TOPIC,
            {
                "type": "AccountCredited",
                "account": target,
                "amount": str(amount),
                "transfer": transfer_id,
                "balance": str(credit.balance),
            },
            key=f"account-{target}",
            headers={"event-type": "AccountCredited"},
        )
        debit.record_event(
            TOPIC,
            {
                "type": "TransferCompleted",
                "transfer": transfer_id,
                "from": source,
                "to": target,
                "amount": str(amount),
            },
            key=f"account-{source}",
            headers={"event-type": "TransferCompleted"},
            dedup_key=f"transfer-completed-{transfer_id}",
        )
    return transfer_id


def cmd_setup(_args) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    engine = create_engine(engine_url())
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        Base.metadata.create_all(conn)
    with Session(engine) as session, session.begin():
        for i in range(1, ACCOUNTS + 1):
            session.add(Account(id=i, owner=f"customer {i}", balance=Decimal("1000.00")))
    with engine.connect() as conn:
        outbox.apply_schema(conn.connection.driver_connection)
        conn.commit()
    # A fresh topic, so that `watch` counts this run's events only.
    admin = AdminClient({"bootstrap.servers": os.environ["OUTBOX_BOOTSTRAP_SERVERS"]})
    if TOPIC in admin.list_topics(timeout=10).topics:
        for f in admin.delete_topics([TOPIC]).values():
            f.result(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        try:
            for f in admin.create_topics(
                [NewTopic(TOPIC, num_partitions=3, replication_factor=1)]
            ).values():
                f.result(timeout=30)
            break
        except Exception as exc:  # the deletion may still be in progress
            if time.monotonic() > deadline:
                raise SystemExit(f"cannot create topic {TOPIC}: {exc}") from exc
            time.sleep(0.2)
    print(f"set up {ACCOUNTS} accounts of 1000.00, the outbox tables and topic {TOPIC}")


def cmd_transfer(args) -> None:
    engine = create_engine(engine_url())
    rng = random.Random(args.seed)
    done = refused = 0
    with Session(engine) as session:
        for _ in range(args.count):
            source, target = rng.sample(range(1, ACCOUNTS + 1), 2)
            amount = Decimal(rng.randint(1, 600))
            try:
                transfer(session, source, target, amount)
                done += 1
            except InsufficientFunds:
                refused += 1
    print(f"{done} transfers committed ({done * 3} events), {refused} refused and rolled back")


def cmd_watch(args) -> None:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": os.environ["OUTBOX_BOOTSTRAP_SERVERS"],
            "group.id": f"demo-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    md = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC]
    consumer.assign([TopicPartition(TOPIC, p, 0) for p in md.partitions])
    seen = 0
    deadline = time.monotonic() + args.timeout
    try:
        while seen < args.expect and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error():
                    continue
                seen += 1
                if seen <= args.show or seen == args.expect:
                    event = json.loads(msg.value())
                    mid = dict(msg.headers() or [])["message_id"].decode()
                    print(
                        f"  p{msg.partition()}@{msg.offset():<5} {msg.key().decode():<11} "
                        f"{event['type']:<18} message_id={mid}"
                    )
                elif seen == args.show + 1:
                    print("  ...")
    finally:
        consumer.close()
    print(f"{seen} events read from Kafka topic {TOPIC}")
    if seen < args.expect:
        sys.exit(f"expected {args.expect} events, saw {seen} within {args.timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup").set_defaults(func=cmd_setup)
    p = sub.add_parser("transfer")
    p.add_argument("count", type=int)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_transfer)
    p = sub.add_parser("watch")
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--show", type=int, default=12)
    p.add_argument("--timeout", type=float, default=60)
    p.set_defaults(func=cmd_watch)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
