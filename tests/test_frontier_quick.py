"""bench/frontier.py: the statistics against hand-computed values, and the --quick run end to end
(2 losses x N in {0, 2} x 2 seeds + the two off-policy switches at N=2, 4 steps each; ~20 s of CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from frontier_report import ci, gold_at_kl, staleness_slope, welch_p  # noqa: E402


def test_ci_is_the_t_interval():
    mean, half = ci([1.0, 2.0, 3.0])  # sd 1, t_{0.975, 2} = 4.3027
    assert mean == 2.0
    assert half == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert math.isnan(ci([1.0])[1])


def test_welch_p_matches_the_hand_computed_test():
    # t = (2 - 5) / sqrt(1/3 + 1/3) = -3.674, df = 4 (equal variances and sizes): p = 0.0213
    assert welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.0213, abs=2e-4)
    assert math.isnan(welch_p([1.0], [2.0, 3.0]))


def test_gold_at_matched_kl_interpolates_at_the_first_crossing():
    curve = [{"kl": 0.0, "gold": 0.3}, {"kl": 1.0, "gold": 0.5}, {"kl": 3.0, "gold": 0.4}]
    assert gold_at_kl(curve, 2.0) == pytest.approx(0.45)  # halfway from (1, 0.5) to (3, 0.4)
    assert gold_at_kl(curve, 0.5) == pytest.approx(0.4)
    assert math.isnan(gold_at_kl(curve, 4.0))  # never reached


def test_staleness_slope_is_the_least_squares_slope_on_log2_one_plus_n():
    def run(n, gold):
        return {"n": n, "curve": [{"gold": gold}]}

    # x = log2(1 + N) = 0, 0, 1, 1, 2, 2 for N = 0, 0, 1, 1, 3, 3; y = 0.5, 0.7, 0.4, 0.6, 0.3, 0.5
    # mean x 1, mean y 0.5; Sxy = (-1)(0 + 0.2) + 0 + (1)(-0.2 + 0) = -0.4; Sxx = 4: slope -0.1
    # fitted 0.6, 0.6, 0.5, 0.5, 0.4, 0.4 -> residuals -.1, .1, -.1, .1, -.1, .1
    # SSR 0.06, s^2 = 0.06 / 4 = 0.015, se = sqrt(0.015 / 4) = 0.061237; t = -1.63299, df 4: p = 0.17781
    got = staleness_slope([run(0, 0.5), run(0, 0.7), run(1, 0.4), run(1, 0.6), run(3, 0.3), run(3, 0.5)])
    assert got["slope"] == pytest.approx(-0.1)
    assert got["half"] == pytest.approx(2.7764451 * 0.0612372, rel=1e-5)  # t_{0.975, 4} x se
    assert got["p"] == pytest.approx(0.17781, abs=1e-4)
    assert got["runs"] == 6
    assert math.isnan(staleness_slope([run(0, 0.5), run(0, 0.6), run(0, 0.7)])["slope"])  # one N: no slope


def test_the_lr_probe_widens_past_an_edge_until_the_best_is_inside():
    import frontier

    peak = {"ppo": 3e-3, "online-dpo": 3e-5}  # gold falls with the distance from the peak, in log lr

    def execute(runs):
        calls.append(sorted(r.lr for r in runs if r.loss == "ppo"))
        return {r: {"size": r.size, "loss": r.loss, "lr": r.lr,
                    "curve": [{"gold": -abs(math.log(r.lr / peak[r.loss])), "kl": 0.0}]} for r in runs}

    calls: list = []
    grid = dataclasses.replace(frontier.GRIDS["small"], losses=("ppo", "online-dpo"), sizes=("tiny",))
    chosen, probes = frontier.probe_lrs(grid, execute, lambda msg: None)
    assert chosen == {"tiny": {"ppo": 3e-3, "online-dpo": 3e-5}}
    # ppo: 1e-3 is the grid's top edge -> 3e-3 added; 3e-3 is again the top -> 9e-3 added; then inside
    assert calls[0] == list(frontier.LR_GRID) and calls[-1] == [*frontier.LR_GRID, 3e-3, 9e-3]
    assert len(calls) == 3
    assert {p["lr"] for p in probes if p["loss"] == "online-dpo"} == set(frontier.LR_GRID)  # never widened


@pytest.mark.slow
def test_quick_frontier_run(tmp_path):
    import frontier
    from frontier_task import Task

    # two worker processes; every finished run goes to the partial file
    assert frontier.main(["--quick", "--jobs", "2", "--out-dir", str(tmp_path), "--name", "fq"]) == 0
    partial = (tmp_path / "fq.partial.jsonl").read_text().splitlines()
    grid = frontier.GRIDS["quick"]
    assert len(partial) == len(grid.losses) * len(grid.staleness) * len(grid.seeds) + 2 * len(grid.seeds)
    # a run's numbers do not depend on the process it ran in: a pool run equals the same run here
    pooled = json.loads(partial[0])["row"]
    assert frontier.train(frontier.RunSpec.of(pooled), grid, Task.build("tiny"))["curve"] == pooled["curve"]
    # --resume runs nothing that finished: the same report from the partial file alone (a last line
    # cut short by a kill is skipped)
    first = json.loads((tmp_path / "fq.json").read_text())
    with (tmp_path / "fq.partial.jsonl").open("a") as f:
        f.write(partial[0][: len(partial[0]) // 2] + "\n")
    assert frontier.main(["--quick", "--resume", "--out-dir", str(tmp_path), "--name", "fq"]) == 0
    assert len((tmp_path / "fq.partial.jsonl").read_text().splitlines()) == len(partial) + 1
    assert json.loads((tmp_path / "fq.json").read_text())["runs"] == first["runs"]
    report = json.loads((tmp_path / "fq.json").read_text())
    runs = report["runs"]
    grid = frontier.GRIDS["quick"]
    assert len(runs) == len(grid.losses) * len(grid.staleness) * len(grid.seeds) + 2 * len(grid.seeds)
    for run in runs:
        first = run["curve"][0]
        assert first["step"] == 0 and first["kl"] == 0.0  # the policy starts as the reference: KL exactly 0
        assert [c["step"] for c in run["curve"]] == [0, 2, 4]
        assert all(0.0 <= c["gold"] <= 1.0 for c in run["curve"])
    # common random numbers: every run's first checkpoint evaluates the same model on the same samples
    assert len({run["curve"][0]["gold"] for run in runs}) == 1
    rows = report["summary"]
    assert {(r["loss"], r["switch"], r["N"]) for r in rows} >= {("online-dpo", "default", 2),
                                                                ("proximal-rloo", "learner", 2)}
    assert all(math.isfinite(r["gold"][1]) for r in rows)  # two seeds: a confidence interval
    md = (tmp_path / "fq.md").read_text()
    assert "Gold reward at matched KL" in md and "Ablation of the off-policy switches" in md
    assert "Robustness: slope of final gold" in md
    assert (tmp_path / "fq.png").stat().st_size > 10_000


@pytest.mark.parametrize("args", [["--steps", "0"], ["--eval-every", "-1"], ["--jobs", "two"]])
def test_counts_below_one_are_refused_with_the_argument_named(args, capsys):
    import frontier

    with pytest.raises(SystemExit) as exit_:
        frontier.main(["--quick", *args])
    assert exit_.value.code == 2
    assert f"argument {args[0]}: '{args[1]}' is not a whole number >= 1" in capsys.readouterr().err
