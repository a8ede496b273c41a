"""Which rows of a step's batch each micro-batch holds, on each rank: one pure function.

Why one function. The single-process step, DeepSpeed's per-rank step and DeepSpeed's config
(`gradient_accumulation_steps`, rows per micro-batch) must agree on the split exactly: DeepSpeed
steps the optimizer after a fixed number of micro-batches, and a rank that ran fewer would hang
the others in a collective. So all of them read `micro_plan`, and tests check it against a table.

Rules: a micro-batch holds whole prompt groups (the losses need them), `learner.microBatchSize`
rows at most but one group at least (0: the rank's whole share); each rank trains on a contiguous
share of the groups (`shard_groups`); a rank with fewer real micro-batches than `steps` runs
padding ones (its first micro-batch again, with a zero loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def shard_groups(groups: int, world: int, rank: int) -> range:
    """Rank `rank`'s contiguous share of `groups` prompt groups (sizes differ by one at most)."""
    base, extra = divmod(groups, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def share_rows(groups: int, group_size: int, world: int, rank: int) -> slice:
    """The rows of rank `rank`'s share (rows g*K .. g*K+K-1 are group g)."""
    share = shard_groups(groups, world, rank)
    return slice(share.start * group_size, share.stop * group_size)


@dataclass(frozen=True)
class MicroPlan:
    """How one rank splits one step's batch."""

    share: slice  # this rank's rows of the batch
    rows_per_micro: int  # rows of a full micro-batch (whole groups)
    micro_batches: tuple[tuple[slice, bool], ...]  # (rows, real); padding ones are not real

    @property
    def real(self) -> list[slice]:
        return [rows for rows, real in self.micro_batches if real]

    @property
    def steps(self) -> int:
        """Micro-batches, padding included: DeepSpeed's gradient_accumulation_steps."""
        return len(self.micro_batches)


def micro_plan(groups: int, group_size: int, micro_batch_size: int, world: int = 1, rank: int = 0,
               steps: Optional[int] = None) -> MicroPlan:
    """Rank `rank`'s micro-batches of a batch of `groups` groups of `group_size` rows, padded to
    `steps` (default: no padding). `micro_batch_size` 0 means the whole share in one."""
    share = share_rows(groups, group_size, world, rank)
    rows = share.stop - share.start
    per_micro = max(1, (micro_batch_size or rows) // group_size) * group_size
    real = [slice(s, min(share.stop, s + per_micro)) for s in range(share.start, share.stop, per_micro)]
    steps = len(real) if steps is None else steps
    if len(real) > steps:
        raise ValueError(f"a batch of {groups} groups needs {len(real)} micro-batches on rank {rank}, more than "
                         f"the {steps} configured from learner.promptsPerStep")
    if not real and steps:
        raise ValueError(f"rank {rank} of {world} has no group of a batch of {groups}: "
                         "learner.promptsPerStep must be at least the number of learner processes")
    return MicroPlan(share, per_micro, tuple([(r, True) for r in real] + [(real[0], False)] * (steps - len(real))))
