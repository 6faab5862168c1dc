"""The writer side against the real PostgreSQL: atomicity, bad input, dedup, sync and async."""

import asyncio
import threading

import psycopg
import pytest

import outbox
from outbox import InvalidMessage, InvalidTopic, MessageTooLarge, NotInTransaction


def rows(dsn, where="true"):
    with psycopg.connect(dsn) as c:
        return c.execute(
            f"SELECT id, topic, key, payload, headers, status FROM local_message WHERE {where} "
            "ORDER BY id"
        ).fetchall()


def test_commit_writes_the_row_with_the_exact_bytes(conn, dsn):
    with conn.transaction():
        p = outbox.publish(
            conn,
            topic="payments",
            key="acct-1",
            payload={"amount": 5},
            headers={"source": "test", "raw": b"\x00\x01"},
        )
    (row,) = rows(dsn)
    assert row[0] == p.id
    assert row[1:4] == ("payments", b"acct-1", b'{"amount":5}')
    assert row[4] == [["source", "test"], ["raw", {"base64": "AAE="}]]
    assert row[5] == "PENDING"
    with psycopg.connect(dsn) as c:
        (mid,) = c.execute("SELECT message_id FROM local_message").fetchone()
    assert mid == p.message_id


def test_rollback_writes_nothing_and_publish_never_commits(conn, dsn):
    conn.execute("CREATE TABLE account (id int PRIMARY KEY, balance int)")
    conn.commit()
    conn.execute("INSERT INTO account VALUES (1, 100)")
    outbox.publish(conn, topic="payments", payload={"n": 1})
    # Another session sees nothing until the caller commits.
    assert rows(dsn) == []
    conn.rollback()
    assert rows(dsn) == []
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT count(*) FROM account").fetchone()[0] == 0


def test_savepoint_rollback_drops_only_the_inner_event(conn, dsn):
    with conn.transaction():
        outbox.publish(conn, topic="t", payload={"n": "outer"})
        with pytest.raises(RuntimeError):
            with conn.transaction():
                outbox.publish(conn, topic="t", payload={"n": "inner"})
                raise RuntimeError("business rule failed")
    assert [r[3] for r in rows(dsn)] == [b'{"n":"outer"}']


def test_autocommit_without_a_transaction_is_refused(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(NotInTransaction, match="autocommit"):
            outbox.publish(c, topic="t", payload={})
        with c.transaction():
            outbox.publish(c, topic="t", payload={})
    assert len(rows(dsn)) == 1


def test_failed_transaction_is_refused_with_a_clear_error(conn):
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    with pytest.raises(NotInTransaction, match="roll it back"):
        outbox.publish(conn, topic="t", payload={})


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(topic="bad topic", payload={}), InvalidTopic),
        (dict(topic="t", payload=12), TypeError),
        (dict(topic="t", payload={"x": {1, 2}}), InvalidMessage),
        (dict(topic="t", payload=b"x" * 2_000_000), MessageTooLarge),
        (dict(topic="t", payload={}, headers={"h": 1}), TypeError),
        (dict(topic="t", payload={}, tenant="a b"), InvalidMessage),
        (dict(topic="t", payload={}, tenant=""), InvalidMessage),
        (dict(topic="t", payload={}, tenant="x" * 65), InvalidMessage),
        (dict(topic="t", payload={}, tenant=7), TypeError),
        (dict(topic="t", payload={}, tenant="-"), InvalidMessage),
        (dict(topic="t", payload={}, tenant=".acme"), InvalidMessage),
        (dict(topic="t", payload={}, headers={"outbox_tenant": "x"}), InvalidMessage),
    ],
)
def test_bad_input_raises_before_anything_is_written_and_the_caller_can_go_on(
    conn, dsn, kwargs, error
):
    with conn.transaction():
        outbox.publish(conn, topic="t", payload={"ok": 1})
        with pytest.raises(error):
            outbox.publish(conn, **kwargs)
        outbox.publish(conn, topic="t", payload={"ok": 2})
    assert [r[3] for r in rows(dsn)] == [b'{"ok":1}', b'{"ok":2}']


def test_database_refuses_bad_topics_from_any_client(conn):
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO local_message (topic, payload) VALUES ('a b', 'x')")


@pytest.mark.parametrize("tenant", ["a b", "-", "_x", "x" * 65])
def test_database_refuses_bad_tenants_from_any_client(conn, tenant):
    with pytest.raises(psycopg.errors.CheckViolation, match="local_message_tenant_check"):
        conn.execute(
            "INSERT INTO local_message (topic, payload, tenant) VALUES ('t', 'x', %s)", (tenant,)
        )


def test_the_tenant_is_stored_and_none_is_no_tenant(conn, dsn):
    with conn.transaction():
        outbox.publish(conn, topic="t", payload={}, tenant="acme-eu.1")
        outbox.publish(conn, topic="t", payload={})
        outbox.publish_many(
            conn, [dict(topic="t", payload={}, tenant="globex"), {"topic": "t", "payload": {}}]
        )
    with psycopg.connect(dsn) as c:
        stored = c.execute("SELECT tenant FROM local_message ORDER BY id").fetchall()
    assert [t for (t,) in stored] == ["acme-eu.1", "", "globex", ""]


def test_publish_many_is_one_statement_and_keeps_order(conn, dsn):
    messages = [dict(topic="t", key=f"k{i % 7}", payload={"i": i}) for i in range(5000)]
    statements = []
    conn.add_notice_handler(lambda n: None)
    orig = conn.execute

    def counting(query, *a, **kw):
        statements.append(query)
        return orig(query, *a, **kw)

    conn.execute = counting
    with conn.transaction():
        published = outbox.publish_many(conn, messages)
    assert len(statements) == 1
    assert [p.id for p in published] == sorted(p.id for p in published)
    stored = rows(dsn)
    assert [r[3] for r in stored] == [f'{{"i":{i}}}'.encode() for i in range(5000)]


def test_publish_many_is_all_or_nothing_on_bad_input(conn, dsn):
    with conn.transaction():
        with pytest.raises(InvalidTopic, match="message #2"):
            outbox.publish_many(
                conn, [dict(topic="t", payload={})] * 2 + [dict(topic="", payload={})]
            )
    assert rows(dsn) == []


def test_repeated_dedup_key_returns_the_first_rows_ids_and_writes_nothing(conn, dsn):
    with conn.transaction():
        first = outbox.publish(conn, topic="t", payload={"n": 1}, dedup_key="order-7")
    with conn.transaction():
        again = outbox.publish(conn, topic="t", payload={"n": 2}, dedup_key="order-7")
        both = outbox.publish_many(
            conn,
            [
                dict(topic="t", payload={}, dedup_key="x"),
                dict(topic="t", payload={}, dedup_key="x"),
            ],
        )
    assert (again.id, again.message_id, again.created) == (first.id, first.message_id, False)
    assert both[0].created and not both[1].created and both[0].id == both[1].id
    assert len(rows(dsn)) == 2


def test_lock_key_serialises_writers_of_one_key(dsn):
    """With lock_key, a second writer of the key waits for the first to commit, so id order
    per key equals commit order."""
    first = psycopg.connect(dsn)
    second = psycopg.connect(dsn)
    try:
        outbox.publish(first, topic="t", key="acct-1", payload={"n": 1}, lock_key=True)
        done = threading.Event()

        def write_second():
            outbox.publish(second, topic="t", key="acct-1", payload={"n": 2}, lock_key=True)
            second.commit()
            done.set()

        t = threading.Thread(target=write_second)
        t.start()
        assert not done.wait(0.5), "the second writer must wait for the first's lock"
        first.commit()
        assert done.wait(10)
        t.join(10)
    finally:
        first.close()
        second.close()
    assert [r[3] for r in rows(dsn)] == [b'{"n":1}', b'{"n":2}']


def test_concurrent_writers_lose_nothing(dsn):
    def writer(w):
        with psycopg.connect(dsn) as c:
            for i in range(50):
                with c.transaction():
                    outbox.publish(
                        c, topic="t", key=f"w{w}", payload={"w": w, "i": i}, lock_key=True
                    )

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stored = rows(dsn)
    assert len(stored) == 400
    import json

    for w in range(8):
        seq = [json.loads(r[3])["i"] for r in stored if r[2] == f"w{w}".encode()]
        assert seq == list(range(50))


async def test_async_publish_shares_the_same_rules(dsn):
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        async with aconn.transaction():
            p = await outbox.apublish(aconn, topic="t", key="a", payload={"n": 1})
            many = await outbox.apublish_many(
                aconn, [dict(topic="t", payload="x", dedup_key="d")] * 2
            )
            with pytest.raises(InvalidTopic):
                await outbox.apublish(aconn, topic="..", payload={})
        await aconn.set_autocommit(True)
        with pytest.raises(NotInTransaction):
            await outbox.apublish(aconn, topic="t", payload={})
    assert p.id < many[0].id and many[0].id == many[1].id
    assert len(rows(dsn)) == 2


def test_async_rollback_writes_nothing(dsn):
    async def go():
        async with await psycopg.AsyncConnection.connect(dsn) as aconn:
            await outbox.apublish(aconn, topic="t", payload={})
            await aconn.rollback()

    asyncio.run(go())
    assert rows(dsn) == []


def test_a_dedup_key_is_unique_within_its_tenant(conn, dsn):
    with conn.transaction():
        acme = outbox.publish(conn, topic="t", payload={"n": 1}, dedup_key="order-7", tenant="acme")
        globex = outbox.publish(
            conn, topic="t", payload={"n": 2}, dedup_key="order-7", tenant="globex"
        )
        again = outbox.publish_many(
            conn,
            [
                dict(topic="t", payload={"n": 3}, dedup_key="order-7", tenant="acme"),
                dict(topic="t", payload={"n": 4}, dedup_key="order-7"),
                dict(topic="t", payload={"n": 5}, dedup_key="order-7", tenant="globex"),
            ],
        )
    assert acme.created and globex.created and acme.id != globex.id
    assert [(p.id, p.created) for p in again] == [
        (acme.id, False),
        (again[1].id, True),
        (globex.id, False),
    ]
    assert [r[3] for r in rows(dsn)] == [b'{"n":1}', b'{"n":2}', b'{"n":4}']
