"""Training backends behind one small interface, and the step that every backend shares.

`TorchBackend` trains in one process. The loss is a pure function from losses.py; this module
turns rollout groups into tensors, computes π_θ / π_ref log-probs (and values for PPO), runs the
micro-batches of whole groups, and keeps optimizer state serialisable without pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .api import JobSpec
from .logprobs import pack, response_logprobs
from .losses import LossBatch, LossParams, Normalizer, apply_no_eos_penalty, get_loss, merge_metrics, slice_prepared
from .messages import RolloutGroup
from .models import load_causal_lm


@dataclass
class Batch:
    """Rollout groups as tensors: N = groups * K rows, layout of logprobs.pack."""

    prompts: list[list[int]]
    responses: list[list[int]]
    old_logprobs: torch.Tensor
    mask: torch.Tensor
    raw_scores: torch.Tensor
    eos: torch.Tensor
    group_size: int


def to_batch(groups: list[RolloutGroup], pad_id: int) -> Batch:
    k = len(groups[0].completions)
    if any(len(g.completions) != k for g in groups):
        raise ValueError("all rollout groups of a step must have the same number of completions")
    prompts = [g.prompt_token_ids for g in groups for _ in g.completions]
    responses = [c.token_ids for g in groups for c in g.completions]
    _, _, mask = pack(prompts, responses, pad_id)
    old = torch.zeros_like(mask)
    flat = [lp for g in groups for c in g.completions for lp in c.logprobs]
    old[mask.bool()] = torch.tensor(flat, dtype=old.dtype)
    scores = torch.tensor([c.score for g in groups for c in g.completions])
    eos = torch.tensor([c.eos for g in groups for c in g.completions])
    return Batch(prompts, responses, old, mask, scores, eos, k)


def lr_at(spec: JobSpec, step: int) -> float:
    opt = spec.learner.optimizer
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "linear":
        remaining = spec.learner.total_steps - opt.warmup_steps
        return opt.lr * max(0.0, 1.0 - (step - opt.warmup_steps) / max(1, remaining))
    return opt.lr


class TorchBackend:
    """Single-process training with AdamW."""

    def __init__(self, spec: JobSpec, policy_path: str, reference_path: str) -> None:
        self.spec = spec
        dtype = spec.model.dtype
        self.model = load_causal_lm(policy_path, dtype).train()
        self.ref = load_causal_lm(reference_path, dtype).eval().requires_grad_(False)
        self.loss = get_loss(spec.algorithm.loss)
        self.value_head: Optional[torch.nn.Linear] = None
        params = list(self.model.parameters())
        if self.loss.needs_value_head:
            torch.manual_seed(spec.learner.seed)
            self.value_head = torch.nn.Linear(self.model.config.hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            params += list(self.value_head.parameters())
        opt = spec.learner.optimizer
        self.optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.pad_id = self.model.config.pad_token_id or 0
        self.temperature = spec.generator.sampling.temperature

    # --- the step ------------------------------------------------------------------------

    def _forward(self, batch: Batch, rows: slice, with_values: bool):
        prompts, responses = batch.prompts[rows], batch.responses[rows]
        if not with_values:
            return response_logprobs(self.model, prompts, responses, self.temperature, self.pad_id)[0], None
        ids, attn, mask = pack(prompts, responses, self.pad_id)
        out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        logits = out.logits[:, :-1].float() / self.temperature
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask
        values = self.value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1) * mask
        return logp, values

    def _loss_batch(self, batch: Batch, rows: slice, logprobs, values, ref, old_values, scores) -> LossBatch:
        return LossBatch(
            logprobs=logprobs, old_logprobs=batch.old_logprobs[rows], ref_logprobs=ref[rows],
            mask=batch.mask[rows], scores=scores[rows], group_size=batch.group_size,
            values=values, old_values=None if old_values is None else old_values[rows],
        )

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        spec, k = self.spec, batch.group_size
        n = len(batch.prompts)
        everything = slice(0, n)
        scores = apply_no_eos_penalty(batch.raw_scores, batch.eos, spec.task.reward.no_eos_penalty)
        with torch.no_grad():
            ref = response_logprobs(self.ref, batch.prompts, batch.responses, self.temperature, self.pad_id)[0]
            old_values = self._forward(batch, everything, True)[1] if self.value_head else None
        params = LossParams.from_spec(spec.algorithm, step)
        full = self._loss_batch(batch, everything, None, None, ref, old_values, scores)
        prepared = self.loss.prepare(full, params)
        norm = Normalizer.of(full)
        groups_per_micro = max(1, (spec.learner.micro_batch_size or n) // k)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(spec, step)
        metrics: dict[str, float] = {}
        for _ in range(spec.algorithm.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            parts = []
            for start in range(0, n, groups_per_micro * k):
                rows = slice(start, min(n, start + groups_per_micro * k))
                logp, values = self._forward(batch, rows, self.value_head is not None)
                micro = self._loss_batch(batch, rows, logp, values, ref, old_values, scores)
                loss, m = self.loss(micro, slice_prepared(prepared, rows), params, norm)
                loss.backward()
                parts.append(m)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], spec.learner.optimizer.max_grad_norm
            )
            self.optimizer.step()
            metrics = merge_metrics(parts)
            metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = lr_at(spec, step)
        metrics["beta"] = params.beta
        return metrics

    # --- state ---------------------------------------------------------------------------

    def save_weights(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)

    def load_weights(self, directory: Path) -> None:
        from .snapshots import load_snapshot_state

        self.model.load_state_dict(load_snapshot_state(directory), strict=True)

    def save_state(self, directory: Path) -> None:
        save_optimizer(self.optimizer, directory)
        if self.value_head is not None:
            save_file(self.value_head.state_dict(), str(directory / "value_head.safetensors"))

    def load_state(self, directory: Path) -> None:
        load_optimizer(self.optimizer, directory)
        if self.value_head is not None:
            self.value_head.load_state_dict(load_file(str(directory / "value_head.safetensors")))


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (structure): no pickle."""
    state = optimizer.state_dict()
    tensors, layout = {}, {}
    for pid, entries in state["state"].items():
        layout[str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous()
                layout[str(pid)][name] = {"tensor": True}
            else:
                layout[str(pid)][name] = {"value": value}
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"state": layout, "param_groups": state["param_groups"]}))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state = {
        int(pid): {
            name: tensors[f"{pid}.{name}"] if entry.get("tensor") else entry["value"]
            for name, entry in entries.items()
        }
        for pid, entries in meta["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def make_backend(spec: JobSpec, policy_path: str, reference_path: str):
    """The training backend named by `spec.learner.backend`."""
    if spec.learner.backend == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(spec, policy_path, reference_path)
    return TorchBackend(spec, policy_path, reference_path)
