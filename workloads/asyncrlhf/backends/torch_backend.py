"""Training in one process (`TorchBackend`), and the step every backend shares.

The loss is a pure function from losses/; this module turns a Batch into the loss's inputs:
π_θ / π_ref log-probs (and values for PPO), the full-batch `prepare` and normaliser, then the
micro-batches of whole groups (micro.micro_plan) accumulated into one optimizer step.
`deepspeed_backend.DeepSpeedBackend` subclasses it: it overrides where the step's rows come from
(its share of the groups), how a micro-batch is back-propagated and how the optimizer steps, and
inherits everything else (the full-batch `prepare`, the normaliser, the loss calls, the metrics).

Devices and precision (the torch backend's own; DeepSpeed's engine does its own mixed precision):
the policy trains on `cuda:LOCAL_RANK` when the learner has GPUs (placement.learner_device: a
learner given GPUs without CUDA is refused at start, not run on the CPU), with fp32 master weights
and the forward pass under autocast to `model.dtype` (fp16 adds a gradient scaler); snapshots are
written in `model.dtype` and the fp32 masters go into the checkpoint. The frozen reference lives in
`model.dtype` on the same device, or in host memory between its forward passes
(`learner.offloadReference`).

LoRA (`learner.lora`, lora.py): the policy is the base in `model.dtype`, frozen, wrapped with a PEFT
adapter whose fp32 matrices are all the optimizer sees; the reference is that model with the adapter
switched off (no second copy); snapshots, the masters and the optimizer state are the adapter's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..api import JobSpec
from ..devicereport import report_at_exit
from .. import lora
from ..logprobs import pack, token_logprobs
from ..losses import LossBatch, LossParams, Normalizer, apply_no_eos_penalty, get_loss, merge_metrics, slice_prepared
from ..models import load_causal_lm
from ..placement import learner_device
from ..sizing import count_parameters
from .base import Batch, token_limits
from .micro import MicroPlan, micro_plan
from .optim_state import MASTER_WEIGHTS, load_optimizer, save_optimizer
from ..weightfiles import write_safetensors
from .weights import save_snapshot_files


@dataclass
class StepInputs:
    """What every micro-batch of a step needs, computed once over the FULL batch (no grad)."""

    scores: torch.Tensor  # [N] after the no-EOS penalty
    ref: torch.Tensor  # [N, T] reference token log-probs
    old_values: Optional[torch.Tensor]  # [N, T] value head before the update (ppo)
    prepared: dict[str, torch.Tensor]  # loss.prepare(full batch)
    norm: Normalizer  # counts of the full batch
    params: LossParams


def lr_at(spec: JobSpec, step: int) -> float:
    """The step's learning rate: linear warm-up, then constant or a linear decay to 0 at the last step."""
    opt = spec.learner.optimizer
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "linear":
        remaining = spec.learner.total_steps - opt.warmup_steps
        return opt.lr * max(0.0, 1.0 - (step - opt.warmup_steps) / max(1, remaining))
    return opt.lr


def local_device(spec: JobSpec) -> torch.device:
    """This learner process's device (cuda:LOCAL_RANK, or cpu), made current; refused when the
    spec gives the learner GPUs and this process has no CUDA."""
    device = torch.device(learner_device(spec.learner.gpus_per_node, int(os.environ.get("LOCAL_RANK", 0)),
                                         torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        report_at_exit(f"learner-{os.environ.get('RANK', 0)}", lambda: torch.cuda.max_memory_allocated(device))
    return device


class TorchBackend:
    """Single-process training with AdamW."""

    def __init__(self, spec: JobSpec, policy_path: str, reference_path: str) -> None:
        self.device = local_device(spec)
        self._load_models(spec, policy_path, reference_path)
        self.model.to(self.device)
        params = lora.trainable_parameters(self.model)
        if self.value_head is not None:
            self.value_head.to(self.device)
            params += list(self.value_head.parameters())
        opt = spec.learner.optimizer
        self.optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=spec.model.dtype == "float16")

    def _policy_dtype(self) -> str:
        """The trained weights' dtype: fp32 masters here (autocast computes in model.dtype); with LoRA
        the frozen base stays in model.dtype (PEFT keeps the adapter in fp32)."""
        return self.spec.model.dtype if self.lora else "float32"

    def _autocast(self):
        dtype = self.spec.model.dtype
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def _load_models(self, spec: JobSpec, policy_path: str, reference_path: str) -> None:
        self.spec = spec
        self.lora = spec.learner.lora.enabled
        self.ref = None  # LoRA: the policy with its adapter off
        if not self.lora:
            self.ref = load_causal_lm(reference_path, spec.model.dtype).eval().requires_grad_(False)
        elif reference_path != policy_path:
            raise ValueError(f"learner.lora: the reference of a LoRA run is the policy's base ({policy_path}), "
                             f"but model.reference names {reference_path}: leave model.reference empty")
        self.ref_home = torch.device("cpu") if spec.learner.offload_reference else self.device
        if self.ref is not None:
            self.ref.to(self.ref_home)
        with self._policy_loading():
            self.model = load_causal_lm(policy_path, self._policy_dtype()).train()
        if self.lora:  # seeded: every rank of a DeepSpeed learner must draw the same A matrices
            torch.manual_seed(spec.learner.seed)
            self.model = lora.wrap_policy(self.model, spec.learner.lora, base=policy_path)
        self.loss = get_loss(spec.algorithm.loss)
        self.value_head: Optional[torch.nn.Linear] = None
        if self.loss.needs_value_head:
            torch.manual_seed(spec.learner.seed)
            self.value_head = torch.nn.Linear(self.model.config.hidden_size, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        self.pad_id = self.model.config.pad_token_id or 0
        self.vocab_size, self.max_positions = token_limits(self.model)  # what intake lets through
        self.behaviour_logprobs: Optional[torch.Tensor] = None  # the step's generator log-probs (oldLogprobs learner)
        # what snapshots and checkpoints hold (sizing.py): with LoRA the adapter only
        self.parameter_count = (sum(p.numel() for p in lora.trainable_parameters(self.model)) if self.lora
                                else count_parameters(self.model))
        self.temperature = spec.generator.sampling.temperature

    def _policy_loading(self):
        """The context the trained policy is loaded in (DeepSpeed ZeRO-3 partitions it at load)."""
        return contextlib.nullcontext()

    # --- the step ------------------------------------------------------------------------

    def _outputs(self, ids: torch.Tensor, attn: torch.Tensor, with_values: bool):
        """(logits, value-head outputs or None) of the trained model; DeepSpeed runs its engine here."""
        with self._autocast():
            out = self.model(input_ids=ids, attention_mask=attn, output_hidden_states=with_values)
            values = self.value_head(self._value_input(out.hidden_states[-1])).squeeze(-1) if with_values else None
        return out.logits, values

    def _value_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head's input: the trunk's last hidden state, detached with algorithm.valueHead
        'detached' (the value loss then trains the head only, not the policy's trunk)."""
        hidden = hidden.float()
        return hidden.detach() if self.spec.algorithm.value_head == "detached" else hidden

    def _forward(self, batch: Batch, rows: slice, with_values: bool):
        """Token log-probs (and values) of `rows`, padded to the full batch's width."""
        ids, attn, mask = pack(batch.prompts[rows], batch.responses[rows], self.pad_id)
        ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
        logits, values = self._outputs(ids, attn, with_values)
        logp = token_logprobs(logits, ids, mask, self.temperature)
        width = batch.mask.shape[1]
        if values is not None:
            values = _pad_to(values[:, :-1] * mask, width)
        return _pad_to(logp, width), values

    def _reference(self, batch: Batch, rows: slice) -> torch.Tensor:
        ids, attn, mask = (t.to(self.device) for t in pack(batch.prompts[rows], batch.responses[rows], self.pad_id))
        with self._reference_on_device():
            logits = self._reference_logits(ids, attn)
        return _pad_to(token_logprobs(logits, ids, mask, self.temperature), batch.mask.shape[1])

    def _reference_logits(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if self.ref is not None:
            return self.ref(input_ids=ids, attention_mask=attn).logits
        with self.model.disable_adapter(), self._autocast():  # LoRA: the base is the reference
            return self.model(input_ids=ids, attention_mask=attn).logits

    @contextlib.contextmanager
    def _reference_on_device(self):
        """The reference on the training device for the block (offloaded: moved there and back)."""
        if self.ref_home == self.device or self.ref is None:
            yield
            return
        self.ref.to(self.device)
        try:
            yield
        finally:
            self.ref.to(self.ref_home)

    def _loss_batch(self, batch: Batch, rows: slice, logprobs, values, ref, old_values, scores) -> LossBatch:
        return LossBatch(
            logprobs=logprobs, old_logprobs=batch.old_logprobs[rows], ref_logprobs=ref[rows],
            mask=batch.mask[rows], scores=scores[rows], group_size=batch.group_size,
            values=values, old_values=None if old_values is None else old_values[rows],
            behaviour_logprobs=None if self.behaviour_logprobs is None else self.behaviour_logprobs[rows],
        )

    @torch.no_grad()
    def _learner_old_logprobs(self, batch: Batch) -> torch.Tensor:
        """pi_old recomputed with the learner's weights at the start of the step (algorithm.oldLogprobs
        'learner'): one forward without gradients over this process's micro-batches (padding ones
        too: DeepSpeed's ranks must run the same number of forwards), gathered into the full batch."""
        plan = self.plan(batch)
        parts = [self._forward(batch, rows, False)[0] for rows, _ in plan.micro_batches]
        return self._gather_rows(torch.cat(parts[: len(plan.real)]), batch)

    def _gather_rows(self, local: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Every process's rows of a per-row tensor: here one process holds them all."""
        return local

    @torch.no_grad()
    def _reference_outputs(self, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reference log-probs and old values of every row (DeepSpeed: its share, then gathered)."""
        everything = slice(0, len(batch.prompts))
        ref = self._reference(batch, everything)
        old_values = self._forward(batch, everything, True)[1] if self.value_head is not None else None
        return ref, old_values

    def _step_inputs(self, batch: Batch, step: int) -> StepInputs:
        scores = apply_no_eos_penalty(batch.raw_scores, batch.eos, self.spec.task.reward.no_eos_penalty)
        ref, old_values = self._reference_outputs(batch)
        params = LossParams.from_spec(self.spec.algorithm, step)
        full = self._loss_batch(batch, slice(0, len(batch.prompts)), None, None, ref, old_values, scores)
        return StepInputs(scores, ref, old_values, self.loss.prepare(full, params), Normalizer.of(full), params)

    def _micro_loss(self, batch: Batch, rows: slice, inputs: StepInputs):
        logp, values = self._forward(batch, rows, self.value_head is not None)
        micro = self._loss_batch(batch, rows, logp, values, inputs.ref, inputs.old_values, inputs.scores)
        return self.loss(micro, slice_prepared(inputs.prepared, rows), inputs.params, inputs.norm)

    def plan(self, batch: Batch) -> MicroPlan:
        """The step's micro-batches: here all of them real, over the whole batch."""
        return micro_plan(batch.groups, batch.group_size, self.spec.learner.micro_batch_size)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _update(self, batch: Batch, inputs: StepInputs) -> dict[str, float]:
        """One optimizer step over the whole batch: accumulate the micro-batches, clip, step."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for rows in self.plan(batch).real:
            loss, m = self._micro_loss(batch, rows, inputs)
            self.scaler.scale(loss).backward()  # fp16: scaled; otherwise the loss itself
            parts.append(m)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]], self.spec.learner.optimizer.max_grad_norm
        )
        finite = bool(torch.isfinite(grad_norm))  # a non-finite loss makes the gradient norm non-finite too
        if finite:
            self.scaler.step(self.optimizer)
        else:  # weights are never updated with NaN/Inf: the step is skipped, counted and reported
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # fp16: a smaller scale after an overflow
        metrics = merge_metrics(parts)
        metrics["grad_norm"] = float(grad_norm)
        metrics["skipped_updates"] = 0.0 if finite else 1.0
        return metrics

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        batch = batch.to(self.device)
        self.behaviour_logprobs = None
        if self.spec.algorithm.old_logprobs == "learner":  # the generator's log-probs kept for importanceCap
            self.behaviour_logprobs = batch.old_logprobs
            batch = dataclasses.replace(batch, old_logprobs=self._learner_old_logprobs(batch))
        inputs = self._step_inputs(batch, step)
        self._set_lr(lr_at(self.spec, step))
        metrics: dict[str, float] = {}
        for _ in range(self.spec.algorithm.updates_per_batch):
            metrics = self._update(batch, inputs)
        metrics["lr"] = lr_at(self.spec, step)
        metrics["beta"] = inputs.params.beta
        return metrics

    # --- state ---------------------------------------------------------------------------

    def save_weights(self, directory: Path) -> dict[str, str]:
        if self.lora:
            return lora.save_adapter_files(self.model, directory, self.spec.model.dtype)
        return save_snapshot_files(self.model, directory, self.spec.model.dtype)

    def load_weights(self, directory: Path) -> None:
        from ..snapshots import load_snapshot_state

        self._set_trained_state(load_snapshot_state(directory), str(directory))

    def _trained_state(self) -> dict[str, torch.Tensor]:
        """What a snapshot and the fp32 masters hold: the adapter (LoRA) or every weight."""
        return lora.adapter_state(self.model) if self.lora else self.model.state_dict()

    def _set_trained_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        if self.lora:
            lora.load_adapter_state(self.model, {k: v.to(self.device) for k, v in state.items()}, where)
        else:
            self.model.load_state_dict(state, strict=True)

    def save_state(self, directory: Path) -> None:
        save_optimizer(self.optimizer, directory)
        if self.value_head is not None:
            save_file(self.value_head.state_dict(), str(directory / "value_head.safetensors"))
        if self.spec.model.dtype != "float32":  # the snapshot holds the weights rounded to model.dtype
            write_safetensors(directory / MASTER_WEIGHTS, list(self._trained_state().items()))

    def load_state(self, directory: Path) -> None:
        load_optimizer(self.optimizer, directory)
        if self.value_head is not None:
            self.value_head.load_state_dict(load_file(str(directory / "value_head.safetensors"),
                                                      device=str(self.device)))
        if (directory / MASTER_WEIGHTS).exists():
            self._set_trained_state(load_file(str(directory / MASTER_WEIGHTS), device=str(self.device)),
                                   str(directory / MASTER_WEIGHTS))


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad [rows, t] with zeros to [rows, width]: a micro-batch's rows can be shorter than the batch."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x
