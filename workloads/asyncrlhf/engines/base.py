"""The engine interface the generator loop is written against (the factory is in engines/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float]  # log-probs of the sampled tokens, temperature-scaled
    eos: bool


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Sample]]:
        """`n` samples for each prompt (token ids), with a per-prompt seed."""

    def reload(self, snapshot_dir: str, checksum: Optional[str] = None) -> None:
        """Replace the weights in place with those of a snapshot directory: verified already when
        `checksum` is None, else verified against it while loading (SnapshotError, weights kept)."""

    def close(self) -> None: ...
