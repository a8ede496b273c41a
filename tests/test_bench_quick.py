"""`bench/run_all.py --quick`: every bench with a short variant runs and prints its figures, so the
benches never rot. The figures themselves are not checked against their targets here (a few
steps on a shared CI machine measure nothing); that they are numbers is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import run_all  # noqa: E402

# figures a short run always yields (time-to-target ratios need the target reached: not in 3 steps)
ALWAYS_NUMERIC = {
    "asyncrlhf / raw nats-py, publishes in flight",
    "asyncrlhf in flight / one at a time",
    "our Generator / bare vLLM, tokens/s",
    "HF engine batched / one prompt at a time",
    "TRL GRPO / asyncrlhf sync (HF engine), training wall-clock",
    "sync / async training wall-clock (learner-bound)",
    "learner-bound speed-up / ideal overlap",
}


def test_every_figure_named_as_always_numeric_is_a_figure_of_a_quick_bench():
    quick = {f.label for b in run_all.BENCHES if b.quick is not None for f in b.figures}
    assert ALWAYS_NUMERIC <= quick


@pytest.mark.slow
def test_run_all_quick_runs_every_bench_and_writes_the_summary(tmp_path):
    out = tmp_path / "summary.md"
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    text = out.read_text()
    assert "Machine " in text and "cores" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("bench", "---"):
            rows[cells[1]] = cells
    for figure in ALWAYS_NUMERIC:
        assert figure in rows, f"{figure}: no row in the summary\n{text}"
        assert re.fullmatch(r"[0-9.]+x", rows[figure][2]), f"{figure}: {rows[figure][2]!r} is not a ratio\n{logs}"
        assert rows[figure][4].startswith("`python bench/") and rows[figure][5], rows[figure]  # command, commit
