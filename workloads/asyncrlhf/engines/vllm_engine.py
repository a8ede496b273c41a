"""vLLM engine: the CPU build here, the CUDA build on clusters; same code.

Log-probs are requested in `processed_logprobs` mode, i.e. after temperature scaling, so they
match what the learner computes (logits / T, then log-softmax). After an in-place weight reload
the prefix cache is reset: cached KV blocks were computed with the old weights.

On GPUs (`vllm_options`): tensor parallelism over the generator's engine GPUs
(placement.generator_layout; checked against the model's attention heads before vLLM starts),
CUDA graphs, `gpu_memory_utilization` = `generator.memoryFraction`. On CPUs: eager mode (no CUDA
graphs to capture) and a KV cache of `generator.kvCacheGiB`.

LoRA runs (`learner.lora`): the engine starts with `enable_lora` and serves the base weights; each
adapter snapshot is verified (its files are small) and becomes a new `LoRARequest` (a new id per
snapshot, so vLLM never reuses an adapter it cached under an older one) passed with every generate.
vLLM's CPU build serves LoRA too (checked: greedy tokens equal PEFT's merged model's), so there is
no merged-weights fallback.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from ..api import JobSpec
from ..devicereport import report_at_exit
from ..lora import is_adapter
from ..workload_env import GENERATOR_ID
from ..placement import check_tensor_parallel, generator_devices, generator_layout
from ..snapshots import verify_snapshot
from .base import Sample
from .verified import verify_during

log = logging.getLogger("asyncrlhf.generator")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_options(spec: JobSpec, on_cpu: bool) -> dict:
    """The `vllm.LLM` arguments a spec asks for, on a CPU build or on GPUs."""
    # stats on: vLLM's Prometheus metrics, which the generator's /metrics serves (metrics.port 0: none)
    options = dict(dtype=spec.model.dtype, seed=spec.learner.seed, max_model_len=None,
                   logprobs_mode="processed_logprobs", disable_log_stats=not spec.metrics.port,
                   enforce_eager=on_cpu)
    if spec.learner.lora.enabled:  # one adapter at a time: the newest snapshot's
        rank = min(r for r in VLLM_LORA_RANKS if r >= spec.learner.lora.rank)
        options |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    if on_cpu:
        return options | {"kv_cache_memory_bytes": int(spec.generator.kv_cache_gib * (1 << 30))}
    tp = generator_layout(spec).tensor_parallel
    options |= {"gpu_memory_utilization": spec.generator.memory_fraction, "tensor_parallel_size": tp}
    if tp > 1:
        options["distributed_executor_backend"] = "mp"  # one process per GPU, in this generator's pod
    return options


def attention_heads(model_path: str) -> Optional[tuple[int, int]]:
    """(attention heads, key/value heads) from the model's config, when it can be read without a download."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    return (heads, getattr(config, "num_key_value_heads", None) or heads) if heads else None


def _max_memory_allocated(worker) -> int:
    """Run in each vLLM worker (collective_rpc): the CUDA memory it allocated at most."""
    import torch

    return torch.cuda.max_memory_allocated()


class VLLMEngine:
    def __init__(self, spec: JobSpec, model_path: str) -> None:
        import torch
        from vllm import LLM
        from vllm.platforms import current_platform

        self.spec = spec
        on_cpu = current_platform.is_cpu()
        if not on_cpu or spec.generator.resources.gpus:
            generator_devices(spec, torch.cuda.device_count())  # refuses GPUs asked for and not there
        options = vllm_options(spec, on_cpu)
        heads = attention_heads(model_path)
        if heads and options.get("tensor_parallel_size", 1) > 1:
            check_tensor_parallel(options["tensor_parallel_size"], *heads, where=model_path)
        self.llm = LLM(model=model_path, tokenizer=spec.model.tokenizer or model_path, **options)
        self.loaded = model_path  # what `reload` falls back to when a snapshot fails verification
        self.lora_request = None  # LoRA runs: the adapter generated with (None: the base)
        self._lora_ids = 0
        if not on_cpu:  # the weights live in vLLM's worker processes: ask them
            report_at_exit(f"generator-{os.environ.get(GENERATOR_ID, '0')}",
                           lambda: sum(self.llm.collective_rpc(_max_memory_allocated)))
        sampling = spec.generator.sampling
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
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
            lora_request=self.lora_request,
        )
        return [[self._sample(c) for c in out.outputs] for out in outputs]

    @staticmethod
    def _sample(completion) -> Sample:
        ids = list(completion.token_ids)
        logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, ids)]
        return Sample(token_ids=ids, logprobs=logprobs, eos=completion.finish_reason == "stop")

    def _load(self, directory: str) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": directory})
        self.llm.reset_prefix_cache()

    def reload(self, snapshot_dir: str, checksum: Optional[str] = None) -> None:
        """Load a snapshot in place. With its checksum, verified while vLLM reads it (the previous
        weights are loaded back if it does not match): engines/verified.py."""
        if is_adapter(snapshot_dir):
            self._use_adapter(snapshot_dir, checksum)
            return
        if checksum:
            verify_during(snapshot_dir, checksum, lambda: self._load(snapshot_dir), lambda: self._load(self.loaded))
        else:
            self._load(snapshot_dir)
        self.loaded = snapshot_dir

    def _use_adapter(self, snapshot_dir: str, checksum: Optional[str]) -> None:
        """A LoRA snapshot: verified first (vLLM reads the adapter when it is first used), then served."""
        from vllm.lora.request import LoRARequest

        if checksum:
            verify_snapshot(snapshot_dir, checksum)
        self._lora_ids += 1
        self.lora_request = LoRARequest(f"adapter-{self._lora_ids}", self._lora_ids, snapshot_dir)
        log.info("vLLM LoRA: generating with the adapter of %s (LoRARequest %d, no weight reload)",
                 snapshot_dir, self._lora_ids)
        self.loaded = snapshot_dir

    def close(self) -> None:
        del self.llm
