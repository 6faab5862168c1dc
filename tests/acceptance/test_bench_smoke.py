"""The benchmark harness, in its short form, keeps working: every peer runs, every workload
reports, the plots are drawn. (Figures come from full runs, never from this test.)"""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_smoke_runs_every_peer_and_writes_the_report(admin_dsn, bootstrap, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
        env={**os.environ, "OUTBOX_DSN": admin_dsn, "OUTBOX_BOOTSTRAP_SERVERS": bootstrap},
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {d["peer"] for d in results["drain"]} == {
        "limit",
        "naive",
        "debezium",
        "ours",
        "ours-fast",
    }
    assert all(d["msgs_per_s"] > 0 for d in results["drain"])
    assert {s["peer"] for s in results["steady"]} == {"naive", "debezium", "ours"}
    assert all(s["received"] == s["written"] > 0 for s in results["steady"])
    assert [s["replicas"] for s in results["scaling"]] == [1, 2]
    assert results["profile"], "py-spy sampled the relay"
    report = (tmp_path / "report.md").read_text()
    assert "## Drain" in report and "vs debezium" in report and "vs limit" in report
    assert (tmp_path / "drain.png").stat().st_size > 1000
    assert (tmp_path / "latency.png").stat().st_size > 1000
