"""Held-out evaluation (spec.eval), in the learner process: reward and KL(π‖π_ref) on fresh samples.

Every `eval.everySteps` steps (and after the last; with `beforeTraining` also at step 0) the
learner evaluates the snapshot it has just published: for a fixed set of held-out prompts it
samples `eval.samples` fresh completions from that snapshot, scores them with the task's reward
(the generators' scorer), and estimates the KL divergence to the reference as the mean over the
samples of Σ_t [log π(y_t | ·) − log π_ref(y_t | ·)] (the unbiased "k1" estimator; both models'
logits scaled by the evaluation temperature, as the learner's are). The result is one line of
metrics.jsonl with `"kind": "eval"`, which also goes to the trackers and the report's plot.

Why here and like this:
  * The learner process holds the reference's path and every snapshot, and is the one process
    per job; generators stay busy with training rollouts. The evaluator has its own copies of the
    policy (loaded from the snapshot, so it is backend-agnostic: torch, DeepSpeed ZeRO-3 alike)
    and of the reference — twice the policy's memory, only when evaluation is on.
  * Evaluating a snapshot means the numbers belong to a version generators and `asyncrlhf
    export` see (hence eval.everySteps is a multiple of weightSync.everySteps).
  * Held-out prompts are the same every time (the first eval.numPrompts of their stream, seeded
    apart from the training stream), and sampling is seeded by (seed, step), so two runs of a job
    evaluate alike.
"""

from __future__ import annotations

import logging
import statistics
import time
import zlib
from itertools import islice
from pathlib import Path
from typing import Optional

import torch

from .api import JobSpec
from .logprobs import pack, token_logprobs
from .lora import apply_snapshot, base_logits
from .models import encode_prompt, load_causal_lm, load_tokenizer
from .report import EVAL_KIND, read_evals
from .reward_kinds import OnePassReward, RewardBatch, RewardError, make_reward, score_batch
from .snapshots import load_snapshot_state, version_of
from .tasks import PromptRecord, prompt_stream

log = logging.getLogger("asyncrlhf.evaluation")
HELD_OUT_SEED = 0x5EED_E7A1  # built-in tasks: the held-out stream's seed offset from learner.seed
CHUNK = 16  # prompts per generate call


def due(spec: JobSpec, step: int) -> bool:
    """Whether step `step` (steps done) is evaluated."""
    every = spec.eval_.every_steps
    if every == 0:
        return False
    if step == 0:
        return spec.eval_.before_training
    return step % every == 0 or step == spec.learner.total_steps


def held_out_prompts(spec: JobSpec) -> list[PromptRecord]:
    """The evaluation's prompts: the first eval.numPrompts of the held-out stream."""
    source = spec.eval_.prompts
    try:
        return list(islice(prompt_stream(source, spec.learner.seed + HELD_OUT_SEED), spec.eval_.num_prompts))
    except ValueError as err:
        raise ValueError(f"spec.eval.prompts (the held-out prompts): {err}") from err


def kl_estimate(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample Σ_t (log π − log π_ref) over the response tokens: [N, T] → [N]."""
    return ((policy_logprobs - ref_logprobs) * mask).sum(-1)


def eval_row(step: int, elapsed: float, scores: list[float], kls: list[float], lengths: list[int],
             eos: list[bool], seconds: float) -> dict:
    """The metrics.jsonl line of an evaluation."""
    return {
        "step": step, "kind": EVAL_KIND, "time": round(elapsed, 3), "policy_version": step,
        "eval_reward_mean": statistics.fmean(scores), "eval_reward_std": statistics.pstdev(scores),
        "eval_kl": statistics.fmean(kls), "eval_length_mean": statistics.fmean(lengths),
        "eval_eos_fraction": sum(eos) / len(eos), "eval_samples": len(scores),
        "eval_seconds": round(seconds, 3),
    }


def reward_batch(records: list[PromptRecord], n: int, texts: list[str], where: str) -> RewardBatch:
    """The reward's batch for `n` completions of each record (as the generators build theirs)."""
    owners = [r for r in records for _ in range(n)]
    keys = [k for k in dict.fromkeys(k for r in records for k in r.columns) if k != "answer"]
    columns = {k: [r.columns.get(k) for r in owners] for k in keys} | {"answer": [r.answer for r in owners]}
    return RewardBatch(prompts=[r.prompt for r in owners], completions=texts, columns=columns,
                       where=f"{where} ({len(records)} held-out prompts, {len(texts)} completions)")


class Evaluator:
    """Samples from a snapshot, scores with the task's reward, and measures the KL to the reference."""

    def __init__(self, spec: JobSpec, policy_path: str, reference_path: str, run_dir: str | Path) -> None:
        self.spec = spec
        self.device = torch.device("cuda" if spec.learner.gpus_per_node and torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(spec.model.tokenizer or policy_path)
        self.policy = load_causal_lm(policy_path, spec.model.dtype).to(self.device).eval().requires_grad_(False)
        self.ref = None  # LoRA: the reference is the policy's base, the policy with its adapter off (lora.py)
        if not spec.learner.lora.enabled:
            self.ref = load_causal_lm(reference_path, spec.model.dtype).to(self.device).eval().requires_grad_(False)
        self.reward = make_reward(spec)
        self.records = held_out_prompts(spec)
        self.prompts = [encode_prompt(self.tokenizer, r.prompt, spec.model.chat_template) for r in self.records]
        self.pad_id = self.policy.config.pad_token_id or 0
        self.eos_id = self.policy.config.eos_token_id
        sampling = spec.generator.sampling
        self.temperature = spec.eval_.temperature or sampling.temperature
        self.top_p, self.max_tokens = sampling.top_p, sampling.max_tokens
        done = read_evals(run_dir)
        self.last_step: Optional[int] = done[-1]["step"] if done else None

    @classmethod
    def create(cls, spec: JobSpec, policy_path: str, reference_path: str,
               run_dir: str | Path) -> Optional["Evaluator"]:
        """An evaluator when spec.eval asks for one, else None (nothing loaded)."""
        if spec.eval_.every_steps == 0:
            return None
        return cls(spec, policy_path, reference_path, run_dir)

    def due(self, step: int) -> bool:
        """Due and not done yet (a restarted learner may find its step's evaluation written)."""
        return due(self.spec, step) and self.last_step != step

    def evaluate(self, step: int, snapshot: str, elapsed: float, head=None) -> Optional[dict]:
        """The evaluation line of step `step`: the snapshot of that version (no snapshot: step 0,
        the initial weights); None when the snapshot is not that version's."""
        started = time.monotonic()
        if snapshot:
            if version_of(snapshot) != step:
                log.warning("not evaluating step %d: the newest snapshot is %s", step, snapshot)
                return None
            # a LoRA run's snapshot is an adapter: applied to the base policy (lora.py)
            self.policy = apply_snapshot(self.policy, snapshot, load_snapshot_state(snapshot))
        elif step != 0:
            return None
        if isinstance(self.reward, OnePassReward) and head is not None:
            self.reward.set_head(head)
        scores, kls, lengths, eos = [], [], [], []
        for start in range(0, len(self.records), CHUNK):
            records, prompts = self.records[start:start + CHUNK], self.prompts[start:start + CHUNK]
            seed = zlib.crc32(f"{self.spec.learner.seed}:{step}:{start}".encode())
            try:
                part = self._evaluate_chunk(records, prompts, seed, f"the evaluation at step {step}")
            except RewardError as err:  # not scored 0: no line for this evaluation, training goes on
                log.warning("no evaluation at step %d: %s", step, err)
                return None
            for acc, values in zip((scores, kls, lengths, eos), part):
                acc.extend(values)
        self.last_step = step
        row = eval_row(step, elapsed, scores, kls, lengths, eos, time.monotonic() - started)
        log.info("evaluation at step %d: reward %.4f, KL %.4f", step, row["eval_reward_mean"], row["eval_kl"])
        return row

    @torch.no_grad()
    def _evaluate_chunk(self, records: list[PromptRecord], prompts: list[list[int]], seed: int, where: str):
        n = self.spec.eval_.samples
        responses, eos = self.sample(prompts, n, seed)
        rep_prompts = [p for p in prompts for _ in range(n)]
        ids, attn, mask = (t.to(self.device) for t in pack(rep_prompts, responses, self.pad_id))
        logp = token_logprobs(self.policy(input_ids=ids, attention_mask=attn).logits, ids, mask, self.temperature)
        base = self.ref if self.ref is not None else self.policy
        ref = token_logprobs(base_logits(base, ids, attn), ids, mask, self.temperature)
        kls = kl_estimate(logp, ref, mask).tolist()
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        scores = score_batch(self.reward, reward_batch(records, n, texts, where))
        return scores, kls, [len(r) for r in responses], eos

    def sample(self, prompts: list[list[int]], n: int, seed: int) -> tuple[list[list[int]], list[bool]]:
        """`n` completions per prompt (left-padded batch), each cut after its first EOS."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        torch.manual_seed(seed)
        out = self.policy.generate(
            ids.repeat_interleave(n, 0), attention_mask=attn.repeat_interleave(n, 0), do_sample=True,
            temperature=self.temperature, top_p=self.top_p, top_k=0, max_new_tokens=self.max_tokens,
            pad_token_id=self.pad_id, eos_token_id=self.eos_id,
        )
        responses, ended = [], []
        for row in out[:, width:].tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            responses.append(row[:cut])
            ended.append(self.eos_id in row)
        return responses, ended
