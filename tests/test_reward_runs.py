"""Bring-your-own rewards driving real local runs (HF engine, the tiny model, nats-server):

* a Python function kept next to the job file, on prompts read from a JSONL file, through
  `asyncrlhf run` — its first call raises, and the batch is retried, not scored 0;
* the example reward server (examples/reward_server.py) with a bearer token;
* `asyncrlhf label` publishing preference pairs to a job's bus.

Both runs are in sync mode, so they are the same computation step for step (the same prompts,
samples and weights): equal metrics mean the server's values are the function's values. Each runs
16 steps on fresh prompts and its reward rises (the mean of the last 4 steps > the first 4 + 0.1).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from asyncrlhf.api import AsyncRLHFJob
from asyncrlhf.bus import REWARD_CONSUMER, EmbeddedNats, JobBus, connect, ensure_job_resources, free_port
from asyncrlhf.local import LocalRun
from asyncrlhf.messages import Preference
from asyncrlhf.report import read_metrics
from asyncrlhf.schedule import RecordWindow
from asyncrlhf.tasks import prompt_stream, sort_digits_prompt

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS, K = 16, 16, 4

USER_REWARD = '''
import json
from pathlib import Path

HERE = Path(__file__).parent


def score(prompts, completions, answer, id, **columns):
    marker = HERE / "failed-once"
    if not marker.exists():  # the first batch fails: it must come back, not be scored 0
        marker.write_text("")
        raise RuntimeError("the judge is warming up")
    values = []
    for completion, target in zip(completions, answer):
        got, want = completion.split(), target.split()
        values.append(sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1))
    with open(HERE / "calls.jsonl", "a") as f:
        for record_id, value in zip(id, values):
            f.write(json.dumps({"id": record_id, "value": value}) + "\\n")
    return values
'''


def job(name: str, prompts: dict, reward: dict) -> dict:
    return {"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": name}, "spec": {
        "model": {"policy": "builtin:tiny-sort"},
        "task": {"prompts": prompts, "reward": reward},
        "algorithm": {"loss": "online-dpo", "samplesPerPrompt": K},
        "async": {"mode": "sync"},
        "generator": {"engine": "hf", "sampling": {"maxTokens": 8}},
        "learner": {"promptsPerStep": PROMPTS, "totalSteps": STEPS, "optimizer": {"lr": 5e-4}},
        "nats": {"ackWaitSeconds": 4},
    }}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    """Sort-digits records with an id column, one per prompt of the run: no step repeats one."""
    rng = random.Random(11)
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [sort_digits_prompt(rng) for _ in range(STEPS * PROMPTS)]
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": r.text, "answer": r.answer}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def batches(spec_dict: dict) -> list[list[str]]:
    """The record ids of each step's batch, as the learner releases them."""
    spec = AsyncRLHFJob.model_validate(spec_dict).spec
    window = RecordWindow(prompt_stream(spec.task.prompts, spec.learner.seed), PROMPTS)
    return [[r.columns["id"] for r in window.batch(b)] for b in range(STEPS)]


@pytest.fixture(scope="module")
def python_run(prompt_file, tmp_path_factory):
    """`asyncrlhf run job.yaml` with the reward module beside the job file (not on PYTHONPATH)."""
    here = tmp_path_factory.mktemp("python-reward")
    (here / "my_reward.py").write_text(USER_REWARD)
    manifest = job("py-reward", {"source": "file", "path": str(prompt_file), "field": "prompt"},
                   {"kind": "python", "function": "my_reward:score"})
    (here / "job.yaml").write_text(yaml.safe_dump(manifest))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "asyncrlhf.cli", "run", str(here / "job.yaml"), "--quiet",
                           "--runs-dir", str(here / "runs")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return manifest, here, here / "runs" / "py-reward"


def test_a_python_reward_beside_the_job_file_scores_every_step(python_run):
    manifest, here, run_dir = python_run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    calls = [json.loads(line) for line in (here / "calls.jsonl").read_text().splitlines()]
    values: dict[str, list[float]] = {}
    for c in calls:
        values.setdefault(c["id"], []).append(c["value"])
    for row, ids in zip(rows, batches(manifest)):
        assert all(len(values[i]) == K for i in ids)  # each prompt scored once (K completions), after the retry
        expected = sum(v for i in ids for v in values[i]) / (PROMPTS * K)
        assert row["reward_mean"] == pytest.approx(expected, abs=1e-9)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rollouts_consumed"] == STEPS * PROMPTS  # the failed batch was retried, nothing lost
    assert_reward_rises(rows)


def assert_reward_rises(rows: list[dict]) -> None:
    """The user's reward is what the policy learns: its mean over the last 4 steps is well above the
    first 4 (measured: 0.40 -> 0.60 on fresh prompts every step; step-to-step noise is about 0.05)."""
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (rows[:4], rows[-4:]))
    assert last > first + 0.1, [round(r["reward_mean"], 3) for r in rows]


def test_a_reward_that_raises_is_logged_by_name_and_batch_and_retried(python_run):
    _, here, run_dir = python_run
    assert (here / "failed-once").exists()
    log = (run_dir / "generator-0.log").read_text()
    # how many prompts the failed fetch held depends on timing; the line names the reward, the batch, the cause
    assert re.search(r"python reward my_reward:score raised on batch 0 \((\d+) prompts: py-reward-p0-\d.*; \d+ "
                     r"completions\): RuntimeError: the judge is warming up -- the \1 prompts go back to the queue, "
                     r"retried in 1 s \(failure 1 in a row\)", log), log[-2000:]


def test_the_example_reward_server_gives_the_same_run(python_run, prompt_file, tmp_path, monkeypatch):
    """examples/reward_server.py (started here, with a token) instead of the function: the same
    prompts, samples and weights, so the same rewards, losses and updates step for step."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "examples" / "reward_server.py"), "--port", str(port)],
                              env=os.environ | {"REWARD_SERVER_TOKEN": "s3cret"}, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith("reward server on http://127.0.0.1:")
        monkeypatch.setenv("ASYNCRLHF_REWARD_TOKEN", "s3cret")
        manifest = job("http-reward", {"source": "file", "path": str(prompt_file), "field": "prompt"},
                       {"kind": "http", "http": {"url": f"http://127.0.0.1:{port}/score", "timeoutSeconds": 10}})
        result = asyncio.run(LocalRun(AsyncRLHFJob.model_validate(manifest), tmp_path / "http", quiet=True).run())
    finally:
        server.terminate()
        server.wait(10)
    assert result.ok
    got, expected = read_metrics(result.run_dir), read_metrics(python_run[2])
    assert len(got) == len(expected) == STEPS
    for a, b in zip(got, expected):
        for key in ("reward_mean", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert_reward_rises(got)


def test_label_publishes_preference_pairs_once(tmp_path):
    """`asyncrlhf label` puts each pair on the job's preferences subject; publishing the same file
    again adds nothing (content ids, de-duplicated by the bus); a bad file publishes nothing."""
    manifest = job("labels", {"source": "builtin"}, {"kind": "onepass"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(manifest))
    pairs = [{"prompt": "3 1 2 =", "chosen": "1 2 3", "rejected": "3 2 1"},
             {"prompt": "9 0 =", "chosen": "0 9", "rejected": "9 0", "id": "mine-1", "source": "judge"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "bad.jsonl").write_text(json.dumps(pairs[0]) + "\n" + '{"prompt": "x", "chosen": "y"}\n')
    nats = EmbeddedNats().start()
    try:
        bus = JobBus("default", "labels")

        async def setup_and_read(count: int) -> list[Preference]:
            nc = await connect(nats.url)
            js = nc.jetstream()
            await ensure_job_resources(js, bus, 1 << 24, 30)
            sub = await js.pull_subscribe_bind(REWARD_CONSUMER, bus.stream)
            msgs = await sub.fetch(count, timeout=5) if count else []
            await nc.close()
            return [Preference.decode(m.data) for m in msgs]

        asyncio.run(setup_and_read(0))

        def label(*args):
            return subprocess.run([sys.executable, "-m", "asyncrlhf.cli", "label", str(tmp_path / "job.yaml"), *args,
                                   "--nats-url", nats.url], capture_output=True, text=True, timeout=120)

        bad = label(str(tmp_path / "bad.jsonl"))
        assert bad.returncode == 2
        assert "bad.jsonl: 1 bad line(s), nothing published:\n  line 2: rejected missing or not text" in bad.stderr
        first = label(str(tmp_path / "pairs.jsonl"))
        assert first.returncode == 0, first.stderr
        assert "published 2 preference pairs to asyncrlhf.default.labels.preferences" in first.stdout
        assert label(str(tmp_path / "pairs.jsonl")).returncode == 0  # again: de-duplicated
        got = asyncio.run(setup_and_read(10))
        assert [(p.prompt, p.chosen, p.rejected, p.source) for p in got] == [
            ("3 1 2 =", "1 2 3", "3 2 1", "human"), ("9 0 =", "0 9", "9 0", "judge")]
        assert got[1].id == "mine-1" and got[0].id.startswith("pref-")
    finally:
        nats.close()
