"""The engine interface the generator loop is written against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..api import JobSpec


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # log-probs of the sampled tokens, temperature-scaled
    eos: bool


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Sample]]:
        """`n` samples for each prompt (token ids), with a per-prompt seed."""

    def reload(self, snapshot_dir: str) -> None:
        """Replace the weights in place with those of a verified snapshot directory."""

    def close(self) -> None: ...


def make_engine(spec: JobSpec, model_path: str) -> Engine:
    """The engine named by `spec.generator.engine`; vLLM is imported only when chosen."""
    if spec.generator.engine == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(spec, model_path)
    from .hf import HFEngine

    return HFEngine(spec, model_path)
