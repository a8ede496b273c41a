"""The core loop for real: nats-server, vLLM's CPU engine, torch training, processes that die.

These start vLLM (about a minute each on 2 cores); they are the proof that the pieces fit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from asyncrlhf.api import AsyncRLHFJob, JobSpec
from asyncrlhf.bus import connect
from asyncrlhf.checkpoints import CheckpointStore
from asyncrlhf.generator import Generator
from asyncrlhf.local import LocalRun
from asyncrlhf.messages import WeightsAnnouncement
from asyncrlhf.models import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from asyncrlhf.report import read_metrics
from asyncrlhf.snapshots import write_snapshot

pytestmark = pytest.mark.slow


def tiny_job(name: str, **overrides) -> AsyncRLHFJob:
    spec = {
        "algorithm": {"loss": "online-dpo", "samplesPerPrompt": 4},
        "generator": {"engine": "vllm", "kvCacheGiB": 0.25, "sampling": {"maxTokens": 8}},
        "learner": {"promptsPerStep": 8, "totalSteps": 12, "optimizer": {"lr": 3e-4}},
        "nats": {"ackWaitSeconds": 4},
    }
    for section, values in overrides.items():
        spec.setdefault(section, {}).update(values)
    return AsyncRLHFJob.model_validate({"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob",
                                        "metadata": {"name": name}, "spec": spec})


def consumed_ids(run_dir: Path) -> list[str]:
    """Every rollout group id the learner trained on, step by step, from its ledger."""
    lines = (run_dir / "ledger.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))  # each step once, in order
    return [rid for s in steps for rid, _generator, _version in s["rollouts"]]


def final_state(run_dir: Path) -> dict:
    return asdict(CheckpointStore(run_dir / "volume").load().state)


def test_vllm_reload_gives_the_learners_greedy_output(tmp_path):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from asyncrlhf.engines.vllm_engine import VLLMEngine

    tiny = resolve_model("builtin:tiny-sort")
    spec = JobSpec.model_validate({"generator": {"kvCacheGiB": 0.25}})
    engine = VLLMEngine(spec, tiny)
    tokenizer = load_tokenizer(tiny)
    prompts = [encode_prompt(tokenizer, t) for t in ("3 1 2 =", "9 0 9 5 =", "7 7 1 =", "4 2 8 6 1 =")]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)

    def vllm_greedy():
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    before = vllm_greedy()
    learner_model = load_causal_lm(tiny)  # "train" it: a large step in a random direction
    torch.manual_seed(3)
    with torch.no_grad():
        for p in learner_model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    info = write_snapshot(tmp_path, 1, learner_model.save_pretrained)
    generator = Generator(spec, bus=None, nats_url="", generator_id="g", engine=engine)
    assert generator.try_reload(WeightsAnnouncement(version=1, path=info.path, checksum=info.checksum))
    after = vllm_greedy()

    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        out = learner_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=8, eos_token_id=2, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    expected = [e[: e.index(2) + 1] if 2 in e else e for e in expected]
    assert after == expected
    assert after != before  # the reload really changed the weights in the engine
    engine.close()


async def _run_and_kill(run: LocalRun, kill_after_step: int) -> dict:
    task = asyncio.create_task(run.run())
    metrics = run.run_dir / "metrics.jsonl"
    killed = False
    while not task.done():
        await asyncio.sleep(0.2)
        if not killed and metrics.exists() and len(read_metrics(run.run_dir)) >= kill_after_step:
            os.kill(run.learner().proc.pid, signal.SIGKILL)
            killed = True
    result = await task
    assert killed, "the run ended before the learner could be killed"
    return result.summary


def test_learner_killed_mid_run_resumes_with_nothing_lost_or_repeated(tmp_path):
    job = tiny_job("killed")
    run = LocalRun(job, tmp_path / "killed", quiet=True)
    summary = asyncio.run(_run_and_kill(run, kill_after_step=5))

    assert summary["ok"] and summary["learner_restarts"] == 1
    steps, prompts = 12, 8
    assert summary["steps"] == steps
    # every rollout produced was consumed exactly once (or counted as dropped)
    assert summary["rollouts_produced"] == summary["rollouts_consumed"] + summary["rollouts_dropped"]
    consumed = consumed_ids(run.run_dir)
    assert final_state(run.run_dir)["consumed"] == len(consumed) == len(set(consumed)) == steps * prompts
    assert set(consumed) == {f"r-killed-p{b}-{i}" for b in range(steps) for i in range(prompts)}
    # the report has each step once, in order, despite the restart
    assert [r["step"] for r in read_metrics(run.run_dir)] == list(range(1, steps + 1))
    assert summary["staleness_max"] <= 1
    assert summary["snapshots_published"] >= steps


def test_sync_mode_with_the_hf_engine_is_on_policy(tmp_path):
    job = tiny_job("sync-hf", generator={"engine": "hf"}, learner={"totalSteps": 4, "promptsPerStep": 4},
                   **{"async": {"mode": "sync"}})
    result = asyncio.run(LocalRun(job, tmp_path / "sync-hf", quiet=True).run())
    rows = read_metrics(result.run_dir)
    assert result.ok and len(rows) == 4
    # in sync mode batch b is generated by policy version b: staleness 0 everywhere
    assert [r["policy_versions"] for r in rows] == [[0], [1], [2], [3]]
    assert result.summary["rollouts_produced"] == result.summary["rollouts_consumed"] == 16
    for name in ("summary.json", "metrics.jsonl", "reward.png"):
        assert (result.run_dir / name).stat().st_size > 0


def _hf_job(name: str, **overrides) -> AsyncRLHFJob:
    overrides["generator"] = {"engine": "hf"} | overrides.get("generator", {})
    overrides["learner"] = {"totalSteps": 3, "promptsPerStep": 4} | overrides.get("learner", {})
    return tiny_job(name, **overrides)


def test_async_with_staleness_0_is_the_sync_step(tmp_path):
    """mode: sync and mode: async with maxStaleness 0 are the same computation, step for step."""
    rows = {}
    for name, section in (("eq-sync", {"mode": "sync"}), ("eq-async0", {"mode": "async", "maxStaleness": 0})):
        result = asyncio.run(LocalRun(_hf_job(name, **{"async": section}), tmp_path / name, quiet=True).run())
        assert result.ok
        rows[name] = read_metrics(result.run_dir)
    assert len(rows["eq-sync"]) == len(rows["eq-async0"]) == 3
    for a, b in zip(rows["eq-sync"], rows["eq-async0"]):
        assert a["policy_versions"] == b["policy_versions"] == [a["step"] - 1]
        for key in ("reward_mean", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_trajectory_balance_trains_from_the_replay_buffer(tmp_path):
    job = _hf_job("tb-replay", algorithm={"loss": "tb", "beta": 0.05},
                  **{"async": {"maxStaleness": 1, "replayBuffer": {"recencyProbability": 0.5}}})
    result = asyncio.run(LocalRun(job, tmp_path / "tb", quiet=True).run())
    rows = read_metrics(result.run_dir)
    assert result.ok and len(rows) == 3
    assert [r["replay_items"] > 0 for r in rows] == [True] * 3
    assert rows[-1]["replay_items"] >= rows[0]["replay_items"]
    assert "logZ_mean" in rows[0] or any(k.lower().startswith("logz") for k in rows[0])


async def _run_with_preferences(run: LocalRun, prefs) -> object:
    from asyncrlhf.bus import PREFERENCES, connect, publish

    task = asyncio.create_task(run.run())
    while not (run.run_dir / "learner-0.log").exists():  # the stream exists once children start
        await asyncio.sleep(0.1)
    nc = await connect(run.url)
    js = nc.jetstream()
    for p in prefs:
        await publish(js, run.bus.subject(PREFERENCES), p.encode(), msg_id=p.id)
    await nc.close()
    return await task


def test_onepass_head_learns_from_the_bus_and_generators_score_with_it(tmp_path):
    from safetensors.numpy import load_file

    from test_rewards import labelled_pairs

    job = _hf_job("onepass", learner={"totalSteps": 4},
                  task={"reward": {"kind": "onepass", "onepass": {"bound": 20.0}}})
    run = LocalRun(job, tmp_path / "onepass", quiet=True)
    prefs = labelled_pairs(120, seed=7)
    result = asyncio.run(_run_with_preferences(run, prefs))
    assert result.ok
    head = load_file(str(CheckpointStore(run.run_dir / "volume").load().directory / "reward_head.safetensors"))
    assert int(head["counts"][0]) == 120  # every label learned once, and checkpointed
    rows = read_metrics(run.run_dir)
    assert rows[-1]["reward_mean"] != 0.0  # generators score with the learned θ (θ = 0 scores 0)


async def _run_and_restart_bus(run: LocalRun, after_step: int, outage: float) -> object:
    task = asyncio.create_task(run.run())
    restarted = False
    while not task.done():
        await asyncio.sleep(0.2)
        if not restarted and len(read_metrics(run.run_dir)) >= after_step:
            run.nats.stop()  # the same store and port come back: JetStream state is on disk
            await asyncio.sleep(outage)
            run.nats.start()
            restarted = True
    result = await task
    assert restarted, "the run ended before the bus could be restarted"
    return result


@pytest.mark.parametrize("outage", [2.0, 8.0])  # 8 s: longer than a bus request's 5 s timeout
def test_job_survives_a_bus_restart(tmp_path, outage):
    job = _hf_job("bus-restart", learner={"totalSteps": 8})
    run = LocalRun(job, tmp_path / "bus", quiet=True)
    result = asyncio.run(_run_and_restart_bus(run, after_step=3, outage=outage))
    assert result.ok and result.summary["steps"] == 8
    # nothing was restarted: the processes rode the outage out
    assert result.summary["learner_restarts"] == 0 and all(c.attempt == 0 for c in run.children)
    consumed = consumed_ids(run.run_dir)
    assert sorted(consumed) == sorted(f"r-bus-restart-p{b}-{i}" for b in range(8) for i in range(4))


async def _run_and_delete_the_stream(run: LocalRun, after_step: int):
    task = asyncio.create_task(run.run())
    while len(read_metrics(run.run_dir)) < after_step:
        assert not task.done(), "the run ended before its stream could be deleted"
        await asyncio.sleep(0.1)
    nc = await connect(run.url)
    await nc.jetstream().delete_stream(run.bus.stream)  # NATS storage lost: prompts, rollouts, weights
    await nc.close()
    return await task


def test_a_lost_stream_is_recreated_and_the_job_goes_on(tmp_path):
    job = _hf_job("lost", learner={"totalSteps": 8})
    run = LocalRun(job, tmp_path / "lost", quiet=True)
    result = asyncio.run(_run_and_delete_the_stream(run, after_step=3))
    assert result.ok and result.summary["steps"] == 8
    assert result.summary["learner_restarts"] == 0 and all(c.attempt == 0 for c in run.children)
    assert "stream was deleted" in (run.run_dir / "learner-0.log").read_text()
    assert [r["step"] for r in read_metrics(run.run_dir)] == list(range(1, 9))


def test_the_local_example_runs_as_shipped(tmp_path):
    """examples/local-tiny.yaml, unchanged but for its length, through `asyncrlhf run`."""
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[1] / "examples" / "local-tiny.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrlhf.cli", "run", str(example), "--steps", "6", "--runs-dir", str(tmp_path),
         "--quiet"], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny-sort" / "summary.json").read_text())
    assert summary["ok"] and summary["steps"] == 6 and summary["engine"] == "vllm"
    assert summary["rollouts_produced"] == summary["rollouts_consumed"] == 6 * 32
    assert summary["peak_memory_gib"] < 8
    assert (tmp_path / "tiny-sort" / "reward.png").stat().st_size > 0


def test_a_child_that_refuses_its_manifest_is_not_restarted(tmp_path):
    """Exit code 2 (bad input) is final: restarting cannot fix it, so the run fails at once."""

    class BadConfigRun(LocalRun):
        def prepare(self) -> None:
            super().prepare()
            self.config.write_text(self.config.read_text().replace("totalSteps: 3", "totalSteps: -3"))

    run = BadConfigRun(_hf_job("refused"), tmp_path / "refused", quiet=True)
    result = asyncio.run(run.run())
    assert not result.ok
    assert result.summary["learner_restarts"] == 0
    assert all(c.attempt == 0 for c in run.children)  # no generator restarted either
    # learner and generator both refuse it; whichever exits first ends the run (the other is stopped)
    refused = [c for c in run.children if c.proc.returncode == 2]
    assert refused
    for child in refused:
        assert "totalSteps" in (tmp_path / "refused" / f"{child.role}-{child.index}.log").read_text()


async def _interrupt_after(run: LocalRun, steps: int) -> None:
    task = asyncio.create_task(run.run())
    while len(read_metrics(run.run_dir)) < steps:
        assert not task.done(), "the run ended before it could be interrupted"
        await asyncio.sleep(0.1)
    task.cancel()  # LocalRun stops its children (SIGTERM: the learner stops between steps)
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_local_run_resumes_where_it_stopped_and_an_earlier_run_is_never_deleted(tmp_path):
    from asyncrlhf.local import ResumeError, run_job

    runs = tmp_path / "runs"
    with pytest.raises(ResumeError, match="nothing to resume"):
        run_job(_hf_job("again"), runs / "again", quiet=True, resume=True)
    asyncio.run(_interrupt_after(LocalRun(_hf_job("again", learner={"totalSteps": 6}), runs / "again", quiet=True),
                                 steps=2))  # as Ctrl-C would: batches released ahead are lost with the bus
    done = len(read_metrics(runs / "again"))
    assert 2 <= done < 6
    # --resume: a new bus (the embedded NATS starts empty), the same volume
    second = run_job(_hf_job("again", learner={"totalSteps": 6}), runs / "again", quiet=True, resume=True)
    assert second.ok and second.summary["steps"] == 6 and second.summary["learner_restarts"] == 0
    assert "resumed from" in (runs / "again" / "learner-0.log").read_text()
    assert [r["step"] for r in read_metrics(runs / "again")] == [1, 2, 3, 4, 5, 6]
    assert sorted(consumed_ids(runs / "again")) == sorted(f"r-again-p{b}-{i}" for b in range(6) for i in range(4))
    # without --resume the job starts over, and the earlier run is moved aside, not deleted
    third = run_job(_hf_job("again", learner={"totalSteps": 2}), runs / "again", quiet=True)
    assert third.ok and [r["step"] for r in read_metrics(runs / "again")] == [1, 2]
    [kept] = [p for p in runs.iterdir() if p.name.startswith("again-")]
    assert [r["step"] for r in read_metrics(kept)] == [1, 2, 3, 4, 5, 6]
