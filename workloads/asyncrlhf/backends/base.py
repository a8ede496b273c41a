"""The interface the learner trains through (`TrainingBackend`), and the batch it hands over.

Why the method names are derived from the Protocol: the learner calls these methods, and on a
learner of several processes `distributed.Leader` forwards each call to the other ranks, which
make it again. Spelling the names once, here, means adding a backend call is one edit (the
Protocol); `BACKEND_METHODS` is what the Leader and the followers are built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..logprobs import pack
from ..messages import RolloutGroup


@dataclass
class Batch:
    """Rollout groups as tensors: N = groups * K rows, layout of logprobs.pack."""

    prompts: list[list[int]]
    responses: list[list[int]]
    old_logprobs: torch.Tensor
    mask: torch.Tensor
    raw_scores: torch.Tensor
    eos: torch.Tensor
    group_size: int

    @property
    def groups(self) -> int:
        return len(self.prompts) // self.group_size

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.prompts, self.responses, self.old_logprobs.to(device), self.mask.to(device),
                     self.raw_scores.to(device), self.eos.to(device), self.group_size)


def to_batch(groups: list[RolloutGroup], pad_id: int) -> Batch:
    k = len(groups[0].completions)
    if any(len(g.completions) != k for g in groups):
        raise ValueError("all rollout groups of a step must have the same number of completions")
    prompts = [g.prompt_token_ids for g in groups for _ in g.completions]
    responses = [c.token_ids for g in groups for c in g.completions]
    _, _, mask = pack(prompts, responses, pad_id)
    old = torch.zeros_like(mask)
    flat = [lp for g in groups for c in g.completions for lp in c.logprobs]
    old[mask.bool()] = torch.tensor(flat, dtype=old.dtype)
    scores = torch.tensor([c.score for g in groups for c in g.completions])
    eos = torch.tensor([c.eos for g in groups for c in g.completions])
    return Batch(prompts, responses, old, mask, scores, eos, k)


@runtime_checkable
class TrainingBackend(Protocol):
    """What the learner needs from a backend (torch in one process, DeepSpeed on several).

    A method's parameters may only be named `batch`, `step` or `directory`: those are what a
    distributed.Command carries to the other ranks (a new kind needs a Command field).
    """

    pad_id: int
    parameter_count: int  # the policy's parameters (whole, also when partitioned): sizes checkpoints
    vocab_size: int  # token ids the policy has embeddings for (the learner dead-letters others; 0: unknown)
    max_positions: int  # prompt + completion tokens the policy can take (0: no limit known)

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        """Train on the step's batch (`algorithm.updatesPerBatch` optimizer steps); its metrics."""

    def save_weights(self, directory: Path) -> dict[str, str]:
        """Write the policy in HF `save_pretrained` layout, in the model's dtype (a snapshot
        generators load); returns {file name: digest} of the files hashed while written."""

    def load_weights(self, directory: Path) -> None:
        """Replace the policy's weights with a snapshot's."""

    def save_state(self, directory: Path) -> None:
        """Write the optimizer state (and the value head) of a checkpoint, without pickle."""

    def load_state(self, directory: Path) -> None:
        """Restore what save_state wrote."""


def token_limits(model) -> tuple[int, int]:
    """(vocab_size, max_positions) of an HF causal LM: the input embedding's rows (ids past them
    fail the lookup; the config's vocab_size can be smaller than the padded matrix) and the
    config's max_position_embeddings (0 when the config names none)."""
    rows = model.get_input_embeddings().num_embeddings
    return int(rows), int(getattr(model.config, "max_position_embeddings", 0) or 0)


# the Protocol's methods in the order they are defined (vars keeps it)
BACKEND_METHODS: tuple[str, ...] = tuple(
    name for name, member in vars(TrainingBackend).items() if callable(member) and not name.startswith("_")
)
