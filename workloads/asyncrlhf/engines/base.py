"""The engine interface the generator loop is written against (the factory is in engines/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
