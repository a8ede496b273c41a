"""HF transformers engine: no vLLM needed; slower, but identical semantics.

Sampling uses the model's own `generate`; the sampled tokens' log-probs are then computed in one
forward pass with temperature-scaled logits (the same computation as the learner's).
"""

from __future__ import annotations

import torch

from ..api import JobSpec
from ..models import load_causal_lm
from ..snapshots import load_snapshot_state
from .base import Sample


class HFEngine:
    def __init__(self, spec: JobSpec, model_path: str) -> None:
        self.model = load_causal_lm(model_path, spec.model.dtype).eval()
        self.sampling = spec.generator.sampling
        self.eos_id = self.model.config.eos_token_id
        self.pad_id = self.model.config.pad_token_id or 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Sample]]:
        from ..logprobs import sequence_token_logprobs

        results = []
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            ids = torch.tensor([prompt] * n)
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True,
                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_new_tokens=self.sampling.max_tokens, pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
            )
            responses = [self._trim(row[len(prompt):].tolist()) for row in out]
            logprobs = sequence_token_logprobs(
                self.model, [prompt] * n, [r for r, _ in responses], self.sampling.temperature, self.pad_id
            )
            results.append([
                Sample(token_ids=r, logprobs=lp, eos=eos) for (r, eos), lp in zip(responses, logprobs)
            ])
        return results

    def _trim(self, tokens: list[int]) -> tuple[list[int], bool]:
        if self.eos_id in tokens:
            return tokens[: tokens.index(self.eos_id) + 1], True
        return tokens, False

    def reload(self, snapshot_dir: str) -> None:
        self.model.load_state_dict(load_snapshot_state(snapshot_dir), strict=True)

    def close(self) -> None:
        del self.model
