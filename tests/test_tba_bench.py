"""bench/tba_bench.py --quick: the searchers simulation runs end to end and its figures are consistent
(no thresholds on who wins: that is the bench's finding, not an invariant)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_quick_tba_bench_writes_its_results(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "tba_bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "tba_bench.json").read_text())
    assert (tmp_path / "tba_bench.md").read_text().startswith("# TBA searchers")
    assert (tmp_path / "tba_bench.png").stat().st_size > 0
    rows = {r["config"]: r for r in result["rows"]}
    assert len(rows) == 5
    for r in rows.values():
        assert all(0.0 < f < 1.0 for f in r["final_reward"])
        assert r["curve_seed0"][0][0] == 0.0
    one, three = rows["online-dpo, 1 generator"], rows["online-dpo, 3 generators"]
    # generation-bound (3 s a batch, 1 s a step): 3 generators feed ~3x the steps of one
    assert 2.5 < sum(three["steps"]) / sum(one["steps"]) <= 3.1
    # a searcher that syncs every 4 versions makes older rollouts than the default group
    assert rows["tb+buffer, 3 searchers (sync 1/2/4)"]["staleness_max"] > rows["tb+buffer, 1 searcher"]["staleness_max"]
