"""HF transformers engine: no vLLM needed; slower, but identical semantics.

All prompts of a call are sampled in one batched decode loop, each prompt with its own seed, and
the sampled tokens' log-probs (temperature-scaled, as the learner computes them) are read in the
same pass: hf_sampling.py. It runs on the generator's first GPU when it has one
(placement.generator_devices), in `model.dtype`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..api import JobSpec
from ..devicereport import report_at_exit
from ..workload_env import GENERATOR_ID
from ..lora import apply_adapter, is_adapter
from ..models import load_causal_lm
from ..placement import generator_devices
from ..snapshots import load_snapshot_state
from .base import Sample
from .hf_sampling import Sampling, sample
from .verified import load_verified_state


MAX_ROWS = 512  # sequences decoded together at most (prompts x samples): bounds the KV cache


class HFEngine:
    def __init__(self, spec: JobSpec, model_path: str) -> None:
        self.device = torch.device(generator_devices(spec, torch.cuda.device_count())[0])
        self.model = load_causal_lm(model_path, spec.model.dtype).eval().to(self.device)
        if self.device.type == "cuda":
            report_at_exit(f"generator-{os.environ.get(GENERATOR_ID, '0')}",
                           lambda: torch.cuda.max_memory_allocated(self.device))
        sampling, eos = spec.generator.sampling, self.model.config.eos_token_id
        self.sampling_args = Sampling(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            eos_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,)),
            pad_id=self.model.config.pad_token_id or 0)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Sample]]:
        """The prompts in batched decode loops of at most MAX_ROWS sequences (the KV cache's size),
        log-probs from the same pass (hf_sampling.py). Each prompt has its own seed, so how they are
        split into loops changes nothing."""
        per = max(1, MAX_ROWS // n)
        groups: list[list[Sample]] = []
        for at in range(0, len(prompts), per):
            chunk = prompts[at:at + per]
            out = sample(self.model, chunk, n, seeds[at:at + per], self.sampling_args)
            tokens, logps, lengths, ended = (t.tolist() for t in out)
            rows = [Sample(token_ids=t[:k], logprobs=lp[:k], eos=e)
                    for t, lp, k, e in zip(tokens, logps, lengths, ended)]
            groups += [rows[i * n:(i + 1) * n] for i in range(len(chunk))]
        return groups

    def reload(self, snapshot_dir: str, checksum: Optional[str] = None) -> None:
        """Load a snapshot in place. With its checksum, verified as it is read (one read of each
        file; nothing changes unless every file matches): engines/verified.py."""
        state = load_verified_state(snapshot_dir, checksum) if checksum else load_snapshot_state(snapshot_dir)
        if is_adapter(snapshot_dir):  # a LoRA run's snapshot: the adapter, applied to the base (PEFT)
            self.model = apply_adapter(self.model, snapshot_dir, state)
            return
        params = self.model.state_dict()
        # on the CPU the loaded tensors become the parameters (no copy) when they fit exactly
        same = self.device.type == "cpu" and all(k in params and v.dtype == params[k].dtype for k, v in state.items())
        self.model.load_state_dict(state, strict=True, assign=same)

    def close(self) -> None:
        del self.model
