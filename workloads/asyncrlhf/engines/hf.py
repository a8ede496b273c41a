"""HF transformers engine: no vLLM needed; slower, but identical semantics.

Sampling uses the model's own `generate`; the sampled tokens' log-probs are then computed in one
forward pass with temperature-scaled logits (the same computation as the learner's). It runs on
the generator's first GPU when it has one (placement.generator_devices), in `model.dtype`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..api import JobSpec
from ..devicereport import report_at_exit
from ..workload_env import GENERATOR_ID
from ..logprobs import pack, token_logprobs
from ..lora import apply_adapter, is_adapter
from ..models import load_causal_lm
from ..placement import generator_devices
from ..snapshots import load_snapshot_state
from .base import Sample
from .verified import load_verified_state


class HFEngine:
    def __init__(self, spec: JobSpec, model_path: str) -> None:
        self.device = torch.device(generator_devices(spec, torch.cuda.device_count())[0])
        self.model = load_causal_lm(model_path, spec.model.dtype).eval().to(self.device)
        if self.device.type == "cuda":
            report_at_exit(f"generator-{os.environ.get(GENERATOR_ID, '0')}",
                           lambda: torch.cuda.max_memory_allocated(self.device))
        self.sampling = spec.generator.sampling
        self.eos_id = self.model.config.eos_token_id
        self.pad_id = self.model.config.pad_token_id or 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Sample]]:
        results = []
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            ids = torch.tensor([prompt] * n, device=self.device)
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True,
                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_new_tokens=self.sampling.max_tokens, pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
            )
            responses = [self._trim(row[len(prompt):].tolist()) for row in out]
            logprobs = self._logprobs([prompt] * n, [r for r, _ in responses])
            results.append([
                Sample(token_ids=r, logprobs=lp, eos=eos) for (r, eos), lp in zip(responses, logprobs)
            ])
        return results

    def _logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        ids, attn, mask = (t.to(self.device) for t in pack(prompts, responses, self.pad_id))
        logp = token_logprobs(self.model(input_ids=ids, attention_mask=attn).logits, ids, mask,
                              self.sampling.temperature)
        return [row[m.bool()].tolist() for row, m in zip(logp.cpu(), mask.cpu())]

    def _trim(self, tokens: list[int]) -> tuple[list[int], bool]:
        if self.eos_id in tokens:
            return tokens[: tokens.index(self.eos_id) + 1], True
        return tokens, False

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
