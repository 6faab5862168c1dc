"""The pipelined loop stopped dead between its two stages: a batch acknowledged by Kafka whose
outcomes were not written yet, and the next batch already read ahead. Against the real pair."""

from __future__ import annotations

import time

import psycopg

from relay.config import RelayConfig
from relay.runner import build_relay
from tests.outages.test_order_outages import relay_config
from tests.relay_process import counts, write
from tests.verify import verify


def config(dsn, bootstrap) -> RelayConfig:
    return relay_config(dsn, bootstrap, batch_size=500)


def test_killed_between_send_and_write_loses_nothing_and_inverts_nothing(dsn, bootstrap, topic):
    write(dsn, topic, 2000, keys=40)
    dead, _ = build_relay(config(dsn, bootstrap))
    try:
        assert dead.step() == 500  # batch 1 sent; batch 2 read ahead meanwhile
        assert dead.step() == 500  # batch 2 sent while batch 1 was written
        assert counts(dsn) == {"CONFIRMED": 500, "PENDING": 1500}
        # The process dies here: no write of batch 2's outcomes, no lease release.
    finally:
        dead.close_stores()
        dead.sink.close(0)
        dead._helper.shutdown(wait=True)
    with psycopg.connect(dsn, autocommit=True) as conn:  # its leases run out
        conn.execute("UPDATE local_message_bucket SET lease_until = now() - interval '1 second'")
        conn.execute("UPDATE local_message_relay SET lease_until = now() - interval '1 second'")

    heir, _ = build_relay(config(dsn, bootstrap))
    try:
        deadline = time.monotonic() + 120
        while counts(dsn).get("CONFIRMED", 0) < 2000:
            assert time.monotonic() < deadline, counts(dsn)
            heir.run_once()
    finally:
        heir.shutdown()
        heir.sink.close(5)
        heir.close_stores()

    verdict = verify(dsn, bootstrap, topic)
    verdict.assert_clean()  # nothing lost, per-key order kept, every row CONFIRMED
    # Batch 2 was in Kafka but not written: the heir sent exactly those 500 again.
    assert verdict.duplicates == 500
