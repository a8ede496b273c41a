"""DeepSpeed ZeRO-2/3 training: the TorchBackend step, data-parallel over the learner's processes.

What is inherited (torch_backend.TorchBackend): the batch layout, the full-batch `prepare` and
`Normalizer`, the loss calls and the metrics. What changes:
  * Rows. Every rank gets the whole batch (distributed.Leader sends it) and trains on its share
    of the prompt groups (contiguous, whole groups; micro.shard_groups). Reference log-probs and PPO's
    old values are computed on the share and all-gathered, so `prepare` sees the full batch.
  * Scale. The losses are already normalised by the FULL batch's counts, so the sum of the ranks'
    gradients is the single-process gradient; DeepSpeed averages over ranks, hence each rank
    back-propagates `world_size * loss`. Gradient accumulation over micro-batches is DeepSpeed's
    (`gradient_accumulation_steps` = micro-batches per rank, fixed by the spec; micro.micro_plan), without its
    1/steps scaling for the same reason. Under ZeRO-3 every forward is a collective, so a rank
    with fewer real micro-batches runs the missing ones with a zero loss.
  * Weights. A snapshot is the policy's HF `save_pretrained` layout written by rank 0, exactly as
    in one process; under ZeRO-3 the partitioned weights are first gathered layer by layer
    (every rank takes part).
  * Optimizer state, without pickle and in TorchBackend's files (optimizer.safetensors +
    optimizer.json, value_head.safetensors): the fp32 master weights and AdamW moments are
    gathered per parameter (deepspeed.utils.safe_get_full_*) and written by rank 0; loading
    broadcasts each tensor from rank 0 and sets it with safe_set_full_*. So a checkpoint does not
    depend on the number of ranks or the ZeRO stage, and torch and DeepSpeed checkpoints are
    interchangeable. The price: rank 0 holds the full fp32 optimizer state in host memory while
    writing (12 bytes per parameter).
  * LoRA (learner.lora, ZeRO-1/2 only: spec/rules.py): DeepSpeed is given the adapter's parameters
    only; snapshots, masters and optimizer state are the adapter's, under PEFT's saved names, so
    they too are interchangeable with TorchBackend's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..api import JobSpec
from .. import lora
from ..devicereport import report_at_exit
from ..losses import merge_metrics
from .base import Batch
from ..placement import learner_device
from .distributed import init_process_group
from .ds_config import accumulation_steps, ds_config, spec_plan  # noqa: F401 (imported from here by tests)
from .micro import MicroPlan, micro_plan, share_rows, shard_groups
from .optim_state import MASTER_WEIGHTS, read_optimizer_state, save_optimizer_state
from .torch_backend import StepInputs, TorchBackend
from .weights import save_snapshot_files


class TrainModule(torch.nn.Module):
    """The trained parameters as one module for DeepSpeed: the policy and (PPO) the value head."""

    def __init__(self, policy: torch.nn.Module, value_head: Optional[torch.nn.Linear],
                 detach_value_input: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.detach_value_input = detach_value_input  # algorithm.valueHead 'detached'

    def forward(self, input_ids, attention_mask, with_values: bool = False):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_values)
        if not with_values:
            return out.logits, None
        hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)
        hidden = hidden.detach() if self.detach_value_input else hidden
        return out.logits, self.value_head(hidden).float().squeeze(-1)


def _skip_shm_comm_build() -> None:
    """DeepSpeed's communication layer on CPU JIT-compiles a shared-memory all-reduce op (minutes
    on a small machine, then cached per user) that only its inference kernels use; training here
    goes through gloo, so it is never built."""
    import importlib

    # (`import deepspeed.comm.torch` would bind the torch package: deepspeed.comm re-exports it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedBackend(TorchBackend):
    """TorchBackend's step on one rank's share of the groups, under a DeepSpeed ZeRO engine."""

    def __init__(self, spec: JobSpec, policy_path: str, reference_path: str) -> None:
        if spec.learner.zero_stage not in (1, 2, 3):
            raise ValueError(f"learner.zeroStage: {spec.learner.zero_stage} with backend 'deepspeed'; use 1, 2 or 3 "
                             "(or learner.backend 'torch' for one process without ZeRO)")
        rdv = init_process_group(cuda=spec.learner.gpus_per_node > 0)
        import deepspeed

        self.rank, self.world = rdv.rank, rdv.world_size
        if spec.learner.prompts_per_step < self.world:
            raise ValueError(f"learner.promptsPerStep ({spec.learner.prompts_per_step}) is smaller than the "
                             f"{self.world} learner processes: every process needs at least one prompt group")
        self.device = torch.device(learner_device(spec.learner.gpus_per_node, rdv.local_rank,
                                                  torch.cuda.device_count()))
        if self.device.type == "cpu":
            _skip_shm_comm_build()
        else:
            report_at_exit(f"learner-{rdv.rank}", lambda: torch.cuda.max_memory_allocated(self.device))
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.zero3 = spec.learner.zero_stage == 3
        config = ds_config(spec, self.world)
        self._config = config
        self._load_models(spec, policy_path, reference_path)
        # under ZeRO-3 the policy was loaded already partitioned (zero.Init): no rank ever held all
        # of it. The reference, only run forward, is whole on each rank.
        self.partitioned_at_load = self.zero3 and all(hasattr(p, "ds_id") for p in self.model.parameters())
        self.steps = config["gradient_accumulation_steps"]
        module = TrainModule(self.model, self.value_head, spec.algorithm.value_head == "detached")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=lora.trainable_parameters(module), config=config)

    def _policy_dtype(self) -> str:
        """DeepSpeed keeps the fp32 masters itself: the module is in model.dtype (bf16 on GPUs)."""
        return self.spec.model.dtype

    @contextlib.contextmanager
    def _policy_loading(self):
        """ZeRO-3: transformers loads the policy under deepspeed.zero.Init, one partition per rank,
        instead of a whole copy in every process's memory (8 GPUs x an 8B model = 8 copies)."""
        if not self.zero3:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        marker = HfDeepSpeedConfig(self._config)  # transformers sees ZeRO-3 while this object lives
        try:
            yield
        finally:
            del marker
            unset_hf_deepspeed_config()

    # --- the step ------------------------------------------------------------------------

    def _outputs(self, ids, attn, with_values):
        return self.engine(ids, attn, with_values)

    def share(self, batch: Batch) -> slice:
        return share_rows(batch.groups, batch.group_size, self.world, self.rank)

    @torch.no_grad()
    def _reference_outputs(self, batch: Batch):
        rows = self.share(batch)
        ref = self._gather_rows(self._reference(batch, rows), batch)
        old_values = None
        if self.value_head is not None:
            old_values = self._gather_rows(self._forward(batch, rows, True)[1], batch)
        return ref, old_values

    def _gather_rows(self, local: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Every rank's share of a per-row tensor, concatenated in rank order: the full batch."""
        k = batch.group_size
        shares = [shard_groups(batch.groups, self.world, r) for r in range(self.world)]
        most = max(len(s) for s in shares) * k
        padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: len(s) * k] for part, s in zip(parts, shares)])

    def plan(self, batch: Batch) -> MicroPlan:
        """This rank's share in micro-batches, padded to the configured `steps` (the same on every rank)."""
        return micro_plan(batch.groups, batch.group_size, self.spec.learner.micro_batch_size, self.world, self.rank,
                          self.steps)

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _update(self, batch: Batch, inputs: StepInputs) -> dict[str, float]:
        parts, bad = [], False
        lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        for rows, real in self.plan(batch).micro_batches:
            loss, m = self._micro_loss(batch, rows, inputs)
            # a non-finite loss on any rank: every rank skips its backward (a collective) and the
            # optimizer steps with lr 0, so weights are never updated with NaN/Inf
            bad = self._any_rank(bad or not bool(torch.isfinite(loss)))
            if not bad:
                self.engine.backward(loss * (self.world if real else 0.0), scale_wrt_gas=False)
            else:
                self._set_lr(0.0)
            self.engine.step()  # DeepSpeed steps the optimizer at the last micro-batch only
            if real:
                parts.append(m)
        for group, lr in zip(self.engine.optimizer.param_groups, lrs):
            group["lr"] = lr
        metrics = self._sum_over_ranks(merge_metrics(parts))
        metrics["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        metrics["skipped_updates"] = 1.0 if bad else 0.0
        return metrics

    def _sum_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """The losses' metrics are additive over rows, hence over ranks too."""
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(names, values.tolist()))

    # --- weights -------------------------------------------------------------------------

    def _policy_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The full policy weights on rank 0 (None elsewhere); every rank must call it."""
        if not self.zero3:
            return self.model.state_dict() if self.rank == 0 else None
        # gathers one module at a time onto rank 0 (the public save_16bit_model also writes the file)
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        return {name[len("policy."):]: t for name, t in state.items() if name.startswith("policy.")}

    def save_weights(self, directory: Path) -> dict[str, str]:
        if self.lora:  # ZeRO-1/2: every rank holds the whole adapter
            return lora.save_adapter_files(self.model, directory, self.spec.model.dtype) if self.rank == 0 else {}
        state = self._policy_state()
        if self.rank != 0:
            return {}
        return save_snapshot_files(self.model, directory, self.spec.model.dtype, state)

    def load_weights(self, directory: Path) -> None:
        from ..snapshots import load_snapshot_state

        if self.lora:
            self._load_adapter(load_snapshot_state(directory) if self.rank == 0 else {}, str(directory))
            return
        state = load_snapshot_state(directory) if self.rank == 0 else {}
        if self.rank == 0:
            expected = {name for name, _ in self.model.named_parameters()}
            if set(state) - expected or expected - set(state):
                raise ValueError(f"snapshot {directory} does not fit the policy: missing "
                                 f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
        for name, param in self.model.named_parameters():
            self._set_full(param, self._from_rank0(state.get(name), param))

    def _load_adapter(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Rank 0's adapter tensors (PEFT's saved names, checked there) into every rank's adapter and masters."""
        if self.rank == 0:
            lora.load_adapter_state(self.model, state, where)
        for name, param in self._trained():
            if name.startswith("policy."):
                self._set_full(param, self._from_rank0(param.data if self.rank == 0 else None, param))

    def _trained(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters DeepSpeed trains (LoRA: the adapter's and the value head's), by module name."""
        return [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _from_rank0(self, value: Optional[torch.Tensor], param) -> torch.Tensor:
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        out = value.to(self.device, torch.float32) if self.rank == 0 else torch.empty(
            shape, dtype=torch.float32, device=self.device)
        dist.broadcast(out, 0)
        return out

    def _set_full(self, param, value: torch.Tensor) -> None:
        """Set a parameter everywhere it lives: the model's copy and the fp32 master partition."""
        from deepspeed import zero

        if self.zero3:
            with zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0:
                    param.data.copy_(value)
        else:
            param.data.copy_(value)
        self._set_hp(param, value)

    def _set_hp(self, param, value: torch.Tensor, key: Optional[str] = None) -> None:
        """Set this rank's part of a full fp32 tensor: the master weights (key None) or an Adam moment."""
        from deepspeed import utils

        if not self.zero3:
            if key is None:
                utils.safe_set_full_fp32_param(param, value)
            else:
                utils.safe_set_full_optimizer_state(param, value, key)
            return
        # ZeRO-3's safe_set_full_* slices past the end when the size is not a multiple of the
        # world (the last partition is padded: a 1-element bias on 2 ranks); cut it here instead
        part = param.ds_tensor.numel()
        flat = torch.zeros(part * self.world, dtype=torch.float32, device=value.device)
        flat[: value.numel()] = value.flatten()
        local = flat[self.rank * part : (self.rank + 1) * part]
        if key is None:
            utils.safe_set_local_fp32_param(param, local)
        else:
            utils.safe_set_local_optimizer_state(param, local, key)

    # --- optimizer state -----------------------------------------------------------------

    def _adam_step(self) -> int:
        steps = [int(s["step"]) for s in self.engine.optimizer.optimizer.state.values() if "step" in s]
        return max(steps, default=0)

    def save_state(self, directory: Path) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._adam_step()
        named = self._trained()
        state, master = {}, {}
        for pid, (name, param) in enumerate(named):
            full = safe_get_full_fp32_param(param)
            moments = {key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")} if step else {}
            if self.rank == 0:
                master[name] = full.cpu()
                if step:
                    state[pid] = {"step": torch.tensor(float(step))} | {k: v.cpu() for k, v in moments.items()}
        if self.rank != 0:
            return
        hyper = {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in self.engine.optimizer.param_groups[0].items() if k != "params"}
        save_optimizer_state({"state": state, "param_groups": [hyper | {"params": list(range(len(named)))}]}, directory)
        if self.value_head is not None:
            save_file({k[len("value_head."):]: v for k, v in master.items() if k.startswith("value_head.")},
                      str(directory / "value_head.safetensors"))
        if self.spec.model.dtype != "float32":
            save_file({lora.saved_name(k[len("policy."):], self.lora): v for k, v in master.items()
                       if k.startswith("policy.")}, str(directory / MASTER_WEIGHTS))

    def load_state(self, directory: Path) -> None:
        """Optimizer moments and step (and fp32 masters, value head) from a TorchBackend-format checkpoint."""
        saved = read_optimizer_state(directory) if self.rank == 0 else None
        extra = self._extra_weights(directory) if self.rank == 0 else {}
        step = self._broadcast_int(int(saved["state"][0]["step"]) if saved and saved["state"] else 0)
        named = self._trained()
        for name, param in named:
            if self._broadcast_int(int(name in extra)):
                self._set_full(param, self._from_rank0(extra.get(name), param))
        if not step:
            return
        self._create_adam_state()
        for pid, (_, param) in enumerate(named):
            for key in ("exp_avg", "exp_avg_sq"):
                value = saved["state"][pid][key] if self.rank == 0 else None
                self._set_hp(param, self._from_rank0(value, param), key)
        for s in self.engine.optimizer.optimizer.state.values():
            s["step"] = torch.tensor(float(step))

    def _extra_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        out = {}
        if (directory / MASTER_WEIGHTS).exists():
            names = {lora.saved_name(n[len("policy."):], self.lora): n for n, _ in self._trained()
                     if n.startswith("policy.")}
            out |= {names.get(k, f"policy.{k}"): v for k, v in load_file(str(directory / MASTER_WEIGHTS)).items()}
        if self.value_head is not None and (directory / "value_head.safetensors").exists():
            out |= {f"value_head.{k}": v for k, v in load_file(str(directory / "value_head.safetensors")).items()}
        return out

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _broadcast_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, 0)
        return int(t.item())

    def _create_adam_state(self) -> None:
        """AdamW creates its state at the first step; make one that changes nothing (lr 0, zero
        gradients) so that there is state to overwrite. Every rank runs it (it is collective)."""
        if self.engine.optimizer.optimizer.state:
            return
        lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        self._set_lr(0.0)
        ids = torch.tensor([[self.pad_id, self.pad_id]], device=self.device)
        for _ in range(self.steps):
            logits, values = self._outputs(ids, torch.ones_like(ids), self.value_head is not None)
            loss = logits.float().sum() * 0.0 + (values.sum() * 0.0 if values is not None else 0.0)
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()
        for group, lr in zip(self.engine.optimizer.param_groups, lrs):
            group["lr"] = lr

