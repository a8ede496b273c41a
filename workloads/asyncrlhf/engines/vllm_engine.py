"""vLLM engine: the CPU build here, the CUDA build on clusters; same code.

Log-probs are requested in `processed_logprobs` mode, i.e. after temperature scaling, so they
match what the learner computes (logits / T, then log-softmax). After an in-place weight reload
the prefix cache is reset: cached KV blocks were computed with the old weights.
"""

from __future__ import annotations

from ..api import JobSpec
from .base import Sample


class VLLMEngine:
    def __init__(self, spec: JobSpec, model_path: str) -> None:
        from vllm import LLM

        self.spec = spec
        sampling = spec.generator.sampling
        from vllm.platforms import current_platform

        memory = (
            {"kv_cache_memory_bytes": int(spec.generator.kv_cache_gib * (1 << 30))}
            if current_platform.is_cpu()
            else {"gpu_memory_utilization": spec.generator.memory_fraction}
        )
        self.llm = LLM(
            model=model_path,
            tokenizer=spec.model.tokenizer or model_path,
            dtype=spec.model.dtype,
            seed=spec.learner.seed,
            max_model_len=None,
            **memory,
            logprobs_mode="processed_logprobs",
            enforce_eager=True,
            disable_log_stats=True,
        )
        self._temperature = sampling.temperature
        self._top_p = sampling.top_p
        self._max_tokens = sampling.max_tokens

    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n, temperature=self._temperature, top_p=self._top_p, max_tokens=self._max_tokens,
                logprobs=0, seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        return [[self._sample(c) for c in out.outputs] for out in outputs]

    @staticmethod
    def _sample(completion) -> Sample:
        ids = list(completion.token_ids)
        logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, ids)]
        return Sample(token_ids=ids, logprobs=logprobs, eos=completion.finish_reason == "stop")

    def reload(self, snapshot_dir: str) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": snapshot_dir})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm
