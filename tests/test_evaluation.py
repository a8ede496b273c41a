"""Held-out evaluation: when it runs (table), the KL estimator and the line it writes (hand-computed),
the evaluator on the tiny model, the spec's rules (pydantic and CEL alike), and one real local run
(HF engine, tiny model) with evaluation every 2 steps, TensorBoard and offline wandb, exported at the
end and checked against its snapshot."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from test_crd import cel_failures, manifest, pydantic_error, schema_errors
from test_tracking import tensorboard_scalars, wandb_history

from asyncrlhf.api import AsyncRLHFJob, JobSpec
from asyncrlhf.evaluation import Evaluator, due, eval_row, held_out_prompts, kl_estimate
from asyncrlhf.models import load_causal_lm, resolve_model
from asyncrlhf.report import read_evals, read_metrics
from asyncrlhf.snapshots import load_snapshot_state, write_snapshot
from asyncrlhf.tasks import prompt_stream


def spec_with(**eval_section) -> JobSpec:
    return JobSpec.model_validate({"eval": eval_section, "learner": {"totalSteps": 7},
                                   "weightSync": {"everySteps": 1}})


@pytest.mark.parametrize("section,steps_due", [
    ({}, []),  # everySteps 0: never
    ({"everySteps": 2}, [0, 2, 4, 6, 7]),  # the baseline, every 2nd step, and the last
    ({"everySteps": 2, "beforeTraining": False}, [2, 4, 6, 7]),
    ({"everySteps": 7}, [0, 7]),
    ({"everySteps": 10}, [0, 7]),  # longer than the run: the baseline and the end
])
def test_due(section, steps_due):
    spec = spec_with(**section)
    assert [s for s in range(8) if due(spec, s)] == steps_due


def test_kl_estimate_sums_the_log_ratio_over_response_tokens():
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the third token of row 0 is padding
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5; row 1: -0.25 + 0.5 = 0.25
    assert kl_estimate(policy, ref, mask).tolist() == [-0.5, 0.25]


def test_eval_row():
    row = eval_row(4, 12.3456, scores=[1.0, 0.0, 0.5, 0.5], kls=[0.5, 1.5, 0.0, 2.0], lengths=[3, 5, 4, 4],
                   eos=[True, True, False, True], seconds=0.25)
    assert row == {"step": 4, "kind": "eval", "time": 12.346, "policy_version": 4, "eval_reward_mean": 0.5,
                   "eval_reward_std": math.sqrt(0.125), "eval_kl": 1.0, "eval_length_mean": 4.0,
                   "eval_eos_fraction": 0.75, "eval_samples": 4, "eval_seconds": 0.25}


def test_held_out_prompts_are_fixed_and_apart_from_the_training_stream():
    spec = spec_with(everySteps=1, numPrompts=16)
    first, again = held_out_prompts(spec), held_out_prompts(spec)
    assert first == again and len(first) == 16
    training = [next(s) for s in [prompt_stream(spec.task.prompts, spec.learner.seed)] for _ in range(16)]
    assert [r.text for r in first] != [r.text for r in training]


CROSS_FIELD = [
    ("every 2 with snapshots every 2", {"eval": {"everySteps": 2}, "weightSync": {"everySteps": 2},
                                        "async": {"maxStaleness": 1}}, None),
    ("every 3 with snapshots every 2", {"eval": {"everySteps": 3}, "weightSync": {"everySteps": 2},
                                        "async": {"maxStaleness": 1}}, ".eval.everySteps"),
    ("dataset task without held-out prompts", {"eval": {"everySteps": 5},
     "task": {"prompts": {"source": "dataset", "name": "openai/gsm8k"}}}, ".eval.prompts"),
    ("dataset task with its test split", {"eval": {"everySteps": 5, "prompts": {
        "source": "dataset", "name": "openai/gsm8k", "split": "test"}},
     "task": {"prompts": {"source": "dataset", "name": "openai/gsm8k"}}}, None),
    ("dataset task, evaluation off", {"task": {"prompts": {"source": "dataset", "name": "openai/gsm8k"}}}, None),
    ("held-out file without a path", {"eval": {"everySteps": 5, "prompts": {"source": "file"}}}, ".eval.prompts.path"),
]


@pytest.mark.parametrize("case,spec,field", CROSS_FIELD, ids=[c for c, _, _ in CROSS_FIELD])
def test_eval_rules_agree_in_cel_and_pydantic(case, spec, field):
    job = manifest(**spec)
    assert schema_errors(job) == []
    assert cel_failures(job) == ([field] if field else [])
    error = pydantic_error(job)
    assert (error is None) == (field is None), error
    if field:
        assert field.lstrip(".") in error


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model("builtin:tiny-sort")


def test_the_evaluator_kl_is_zero_for_the_reference_and_positive_after_training(tmp_path, tiny):
    spec = JobSpec.model_validate({"eval": {"everySteps": 1, "numPrompts": 8, "samples": 4},
                                   "generator": {"sampling": {"maxTokens": 8}}})
    evaluator = Evaluator.create(spec, tiny, tiny, tmp_path)
    baseline = evaluator.evaluate(0, "", elapsed=0.0)
    assert baseline["eval_kl"] == 0.0  # π = π_ref: every log-ratio is exactly 0
    assert baseline["eval_samples"] == 32 and 0.0 <= baseline["eval_reward_mean"] <= 1.0
    again = evaluator.evaluate(0, "", elapsed=0.0)
    del again["eval_seconds"], baseline["eval_seconds"]
    assert again == baseline  # seeded by (seed, step): the same samples
    assert evaluator.evaluate(1, "", elapsed=0.0) is None  # step 1 has a snapshot: none given, nothing to do

    moved = load_causal_lm(tiny)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    info = write_snapshot(tmp_path / "volume", 1, moved.save_pretrained)
    after = evaluator.evaluate(1, info.path, elapsed=3.0)
    assert after["eval_kl"] > 0.0  # a mean of k1 over 32 samples; KL > 0 in expectation
    assert evaluator.evaluate(2, info.path, elapsed=3.0) is None  # the snapshot is not step 2's
    # the policy copy holds the snapshot's weights, the reference is untouched
    state = load_snapshot_state(info.path)
    assert torch.equal(evaluator.policy.state_dict()["lm_head.weight"], state["lm_head.weight"])
    assert not torch.equal(evaluator.ref.state_dict()["lm_head.weight"], state["lm_head.weight"])


def test_a_restarted_evaluator_knows_which_evaluation_is_written(tmp_path, tiny):
    spec = JobSpec.model_validate({"eval": {"everySteps": 2, "numPrompts": 2}})
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "reward_mean": 0.5}) + "\n" +
                                            json.dumps({"step": 2, "kind": "eval", "eval_reward_mean": 0.5}) + "\n")
    evaluator = Evaluator.create(spec, tiny, tiny, tmp_path)
    assert not evaluator.due(2) and evaluator.due(4) and evaluator.due(0)
    assert Evaluator.create(JobSpec(), tiny, tiny, tmp_path) is None  # evaluation off: nothing loaded


@pytest.mark.slow
def test_a_local_run_evaluates_tracks_and_exports(tmp_path, tiny, monkeypatch):
    from asyncrlhf.export import export
    from asyncrlhf.local import LocalRun

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    job = AsyncRLHFJob.model_validate({
        "apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "tracked"},
        "spec": {
            "model": {"policy": "builtin:tiny-sort"},
            "algorithm": {"loss": "online-dpo", "samplesPerPrompt": 4},
            "generator": {"engine": "hf", "sampling": {"maxTokens": 8}},
            "learner": {"promptsPerStep": 4, "totalSteps": 5, "optimizer": {"lr": 3e-4}},
            "nats": {"ackWaitSeconds": 4},
            "eval": {"everySteps": 2, "numPrompts": 8, "samples": 2},
            "tracking": {"backends": ["tensorboard", "wandb"], "project": "sorting"},
        }})
    result = asyncio.run(LocalRun(job, tmp_path / "tracked", quiet=True).run())
    assert result.ok
    run = result.run_dir
    steps, evals = read_metrics(run), read_evals(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # the baseline, every 2 steps, the last
    assert evals[0]["eval_kl"] == 0.0 and all(r["eval_samples"] == 16 for r in evals)
    assert result.summary["final_eval_step"] == 5

    scalars = tensorboard_scalars(run / "tensorboard")
    assert [s for s, _ in scalars["train/reward_mean"]] == [1, 2, 3, 4, 5]
    assert [v for _, v in scalars["train/reward_mean"]] == [round(r["reward_mean"], 6) for r in steps]
    assert [s for s, _ in scalars["eval/kl"]] == [0, 2, 4, 5]
    history, config, summary, _ = wandb_history(run)
    assert [h["_step"] for h in history if "train/loss" in h] == [1, 2, 3, 4, 5]
    assert [h["eval/reward_mean"] for h in history if "eval/reward_mean" in h] == \
        [r["eval_reward_mean"] for r in evals]
    assert config["eval"]["everySteps"] == 2
    assert summary["final_eval_step"] == 5 and summary["steps"] == 5

    # the snapshot carries the tokenizer, and the export generates what the snapshot's weights do
    snapshot = run / "volume" / "snapshots" / "v5"
    assert (snapshot / "tokenizer.json").is_file() and (snapshot / "tokenizer_config.json").is_file()
    out = export(run, tmp_path / "model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    learner_view = load_causal_lm(tiny).eval()
    learner_view.load_state_dict(load_snapshot_state(snapshot), strict=True)
    for text in ("3 1 2 =", "9 0 9 5 =", "4 2 8 6 1 ="):
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)])
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, pad_token_id=0)
        assert exported.generate(ids, **kwargs).tolist() == learner_view.generate(ids, **kwargs).tolist()
