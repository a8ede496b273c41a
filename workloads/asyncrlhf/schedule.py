"""The learner's bookkeeping rules, pure: which batches to release, with which minimum version, what
an arriving rollout is, and which prompts are still needed. No bus, no model: table-tested.

The rules (N = async.maxStaleness, 0 in sync mode):
  * Batch b may be released once a snapshot of version >= b - N is published, and is tagged
    `min_version = max(0, b - N)`; generators answer with at least that version, so every rollout
    used at step b is at most N versions old. A prompt released again (its rollout was dropped, or
    the bus lost it) gets the same tag: there is one rule.
  * Step b trains exactly batch b, so a rollout of a batch before the current step is a
    redelivery of one already trained on (no id list needed), and a second rollout for a filled
    slot is a duplicate.
"""

from __future__ import annotations

import enum
import itertools
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def min_version(batch: int, max_staleness: int) -> int:
    """The oldest policy version allowed to answer batch `batch`'s prompts."""
    return max(0, batch - max_staleness)


def release_range(published_version: int, max_staleness: int, released_through: int, total_steps: int) -> range:
    """Batches whose prompts may be released now: b <= published + N (and not released yet)."""
    return range(released_through + 1, min(total_steps - 1, published_version + max_staleness) + 1)


def unreleased_from(step: int, released_through: int) -> int:
    """`released_through` after "release every batch not trained on again" (the bus lost them)."""
    return min(released_through, step - 1)


class Verdict(enum.Enum):
    FRESH = "fresh"  # keep it: it fills an empty slot of a batch not trained on yet
    TRAINED = "trained"  # a redelivery of a batch already trained on: ack and skip
    DUPLICATE = "duplicate"  # its slot is filled already: ack and skip
    STALE = "stale"  # older than N versions at the step that will use it: drop, release again


def classify(batch: int, index: int, policy_version: int, step: int, max_staleness: int,
             filled: Iterable[int] | set[int], published: int) -> Verdict:
    """What a rollout of (batch, index) made by `policy_version` is, when the learner is at `step`,
    has published up to version `published`, and batch `batch` has the slots `filled`. A version
    newer than any published is not of this run's lineage (weights of a timeline a restarted
    learner abandoned, or a wrong message): stale too."""
    if batch < step:
        return Verdict.TRAINED
    if index in filled:
        return Verdict.DUPLICATE
    if max(batch, step) - policy_version > max_staleness or policy_version > published:
        return Verdict.STALE
    return Verdict.FRESH


def implausible(batch: int, index: int, prompts_per_step: int, total_steps: int) -> str:
    """Why a rollout's place cannot be right ("" when it can): such a message goes to the dead letters."""
    if index >= prompts_per_step:
        return f"index {index} is past learner.promptsPerStep ({prompts_per_step})"
    if batch >= total_steps:
        return f"batch {batch} is past learner.totalSteps ({total_steps})"
    return ""


def attempt_key(batch: int, index: int) -> str:
    return f"{batch}:{index}"


def forget_attempts(attempts: dict[str, int], step: int) -> dict[str, int]:
    """The re-release counts still needed once every batch before `step` is trained."""
    return {k: v for k, v in attempts.items() if int(k.split(":")[0]) >= step}


class RecordWindow:
    """The prompts of the batches not trained on yet, drawn in order from an endless stream.

    Batch b is prompts [b * per, (b + 1) * per) of the stream. Batches before `start` (a resumed
    run's step) are skipped; those before the current step are forgotten, so memory stays flat
    however long the run."""

    def __init__(self, stream: Iterator[T], per_batch: int, start: int = 0) -> None:
        self._stream, self.per = stream, per_batch
        self._records: list[T] = []
        self.base = start  # the batch _records[0] belongs to
        for _ in itertools.islice(self._stream, start * per_batch):
            pass

    def batch(self, b: int) -> list[T]:
        """Batch b's prompts (b >= the oldest batch kept)."""
        if b < self.base:
            raise IndexError(f"batch {b} was trained on and forgotten (oldest kept: {self.base})")
        need = (b + 1 - self.base) * self.per
        if len(self._records) < need:
            self._records.extend(itertools.islice(self._stream, need - len(self._records)))
        return self._records[(b - self.base) * self.per : need]

    def forget_before(self, step: int) -> None:
        if step > self.base:
            drop = min(len(self._records), (step - self.base) * self.per)
            del self._records[:drop]
            self.base += drop // self.per

    def __len__(self) -> int:
        """Prompts held in memory."""
        return len(self._records)
