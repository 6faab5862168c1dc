"""schema.sql against the real server: idempotent, in any schema, versioned."""

import psycopg
import pytest

import outbox
from outbox import SchemaError


def catalog(conn, schema):
    """What the schema holds: columns, indexes, constraints, triggers, table options."""
    return {
        "columns": conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default, "
            "generation_expression FROM information_schema.columns WHERE table_schema = %s "
            "ORDER BY 1, 2",
            (schema,),
        ).fetchall(),
        "indexes": conn.execute(
            "SELECT indexname, replace(indexdef, %s, '') FROM pg_indexes WHERE schemaname = %s "
            "ORDER BY 1",
            (f" {schema}.", schema),
        ).fetchall(),
        "constraints": conn.execute(
            "SELECT conname, pg_get_constraintdef(c.oid) FROM pg_constraint c "
            "JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = %s ORDER BY 1",
            (schema,),
        ).fetchall(),
        "triggers": conn.execute(
            "SELECT tgname, tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
            "AND NOT tgisinternal ORDER BY 1",
            (schema,),
        ).fetchall(),
        "functions": conn.execute(
            "SELECT p.proname, replace(pg_get_functiondef(p.oid), %s, '') FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s ORDER BY 1",
            (schema, schema),
        ).fetchall(),
        "options": conn.execute(
            "SELECT relname, reloptions FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND relkind = 'r' ORDER BY 1",
            (schema,),
        ).fetchall(),
        "buckets": conn.execute(f'SELECT count(*) FROM "{schema}".local_message_bucket').fetchone(),
    }


def test_schema_applied_twice_changes_nothing(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert outbox.installed_version(conn) is None
        assert outbox.apply_schema(conn) == outbox.SCHEMA_VERSION
        before = catalog(conn, "public")
        assert outbox.apply_schema(conn) == outbox.SCHEMA_VERSION
        assert catalog(conn, "public") == before
        assert before["buckets"] == (256,)


def test_schema_in_a_non_public_schema_is_used_by_publish(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        outbox.apply_schema(conn, "payments")
        assert outbox.installed_version(conn, "public") is None
        with conn.transaction():
            outbox.publish(conn, topic="t", payload={}, schema="payments")
        assert conn.execute("SELECT count(*) FROM payments.local_message").fetchone() == (1,)
        # The trigger function resolves its names in the schema it was created in.
        conn.execute("SET search_path = public")
        with conn.transaction():
            outbox.publish(conn, topic="t", payload={}, schema="payments")


def test_require_schema_says_what_to_do(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        with pytest.raises(SchemaError, match="run `outbox migrate`"):
            outbox.require_schema(conn)
        outbox.apply_schema(conn)
        conn.execute("DELETE FROM local_message_schema WHERE version > 1")
        with pytest.raises(SchemaError, match="version 1 in 'public', this code needs"):
            outbox.require_schema(conn)


def test_bucket_column_matches_the_python_hash(conn):
    from relay.testing import bucket_of

    keys = [b"a", b"order-1", b"\x00\xff", None, None]
    with conn.transaction():
        for k in keys:
            outbox.publish(conn, topic="t", key=k, payload={})
    for row_id, key, bucket in conn.execute("SELECT id, key, bucket FROM local_message"):
        assert bucket == bucket_of(key, row_id)


@pytest.mark.parametrize("start", range(1, outbox.SCHEMA_VERSION))
def test_upgrade_from_every_older_version_equals_a_fresh_install(admin_dsn, start):
    from outbox.schema import migrations
    from tests.conftest import with_dbname

    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS outbox_upgrade_test WITH (FORCE)")
        admin.execute("CREATE DATABASE outbox_upgrade_test")
    try:
        with psycopg.connect(
            with_dbname(admin_dsn, "outbox_upgrade_test"), autocommit=True
        ) as conn:
            conn.execute("CREATE SCHEMA fresh; CREATE SCHEMA upgraded")
            outbox.apply_schema(conn, "fresh")
            with conn.transaction():
                conn.execute("SET LOCAL search_path = upgraded")
                for number, body in migrations().items():
                    if number <= start:
                        conn.execute(body)
            assert outbox.installed_version(conn, "upgraded") == start
            with conn.transaction():
                conn.execute(
                    "INSERT INTO upgraded.local_message (topic, payload) VALUES ('kept', 'x')"
                )
            assert outbox.apply_schema(conn, "upgraded") == outbox.SCHEMA_VERSION
            assert catalog(conn, "upgraded") == catalog(conn, "fresh")
            versions = "SELECT array_agg(version ORDER BY version) FROM {}.local_message_schema"
            assert (
                conn.execute(versions.format("upgraded")).fetchone()
                == conn.execute(versions.format("fresh")).fetchone()
            )
            assert conn.execute("SELECT topic FROM upgraded.local_message").fetchall() == [
                ("kept",)
            ]
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS outbox_upgrade_test WITH (FORCE)")


def test_newer_database_than_the_code_is_refused(empty_dsn):
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        outbox.apply_schema(conn)
        conn.execute("INSERT INTO local_message_schema (version) VALUES (99)")
        with pytest.raises(SchemaError, match="newer than this code"):
            outbox.apply_schema(conn)


def test_reapplying_the_schema_keeps_a_disabled_notify_trigger_disabled(empty_dsn):
    from outbox.sql import schema_sql

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        outbox.apply_schema(conn)
        conn.execute("ALTER TABLE local_message DISABLE TRIGGER local_message_notify")
        conn.execute(schema_sql())  # what `psql -f schema.sql` does
        enabled = conn.execute(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = 'local_message_notify'"
        ).fetchone()
        assert enabled == ("D",)


def test_insert_notifies_once_per_transaction_with_the_schema_name(dsn):
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as writer:
        listener.execute("LISTEN outbox_local_message")
        with writer.transaction():
            outbox.publish_many(writer, [dict(topic="t", payload={})] * 3)
            outbox.publish(writer, topic="t", payload={})
        notes = list(listener.notifies(timeout=5, stop_after=1))
        assert [(n.channel, n.payload) for n in notes] == [("outbox_local_message", "public")]
        assert list(listener.notifies(timeout=0.3)) == [], "collapsed into one per transaction"


INVALID_TOPICS = [
    "",
    ".",
    "..",
    "has space",
    "a" * 250,
    "semi;colon",
    "drop table x;--",
    "ü",
    "tab\there",
    "new\nline",
]
VALID_TOPICS = ["a", "A.b_c-9", "a" * 249, "...", "0"]


def test_the_table_refuses_exactly_the_topics_the_writer_refuses(empty_dsn):
    """Any client, not only publish(), meets Kafka's topic rule at write time; the cheap
    constraint of migration 3 draws the same line as the writer's own check."""
    from outbox.errors import InvalidTopic
    from outbox.message import build_message

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        outbox.apply_schema(conn)
        for topic in INVALID_TOPICS:
            with pytest.raises(InvalidTopic):
                build_message(topic=topic, payload={})
            with pytest.raises(psycopg.errors.CheckViolation, match="topic_check"):
                conn.execute("INSERT INTO local_message (topic, payload) VALUES (%s, '')", (topic,))
        for topic in VALID_TOPICS:
            build_message(topic=topic, payload={})
            conn.execute("INSERT INTO local_message (topic, payload) VALUES (%s, '')", (topic,))
        assert conn.execute("SELECT count(*) FROM local_message").fetchone() == (len(VALID_TOPICS),)
