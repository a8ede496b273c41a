"""Learner checkpoints: the format, the atomic save, and restore with a fallback.

Layout: `<root>/checkpoints/step-<n>/` holds the backend's files (optimizer state, value head, fp32
masters), the extras the learner adds (the reward head) and `state.json` (LearnerState plus the
snapshot the weights are in); `<root>/checkpoints/LATEST` names the newest. The learner acks
rollouts once the checkpoint that covers them is saved, so a save is the durable one of
storage.atomic_dir, and LATEST is written durably after it. The last CHECKPOINTS_KEPT are kept:
when the newest cannot be read, restore falls back to the one before it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .faults import fault_point
from .snapshots import SnapshotInfo, version_of
from .storage import atomic_dir, atomic_write_text

log = logging.getLogger("asyncrlhf.checkpoints")
CHECKPOINTS_KEPT = 2
STATE = "state.json"
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LearnerState:
    """Everything a restarted learner needs besides weights and optimizer (JSON in the checkpoint)."""

    step: int = 0
    published_version: int = 0
    released_through: int = -1
    consumed: int = 0  # rollout groups trained on
    dropped: int = 0
    duplicates: int = 0
    dead: int = 0  # messages set aside in the dead letters (undecodable, bad values, out of bounds)
    rereleased: dict[str, int] = field(default_factory=dict)  # "batch:index" -> attempts
    staleness_sum: int = 0
    staleness_max: int = 0
    last_snapshot: str = ""
    elapsed: float = 0.0  # training wall-clock before this process (restarts add up)
    replay: Optional[dict] = None  # the replay buffer's state (JSON), when it is used
    replay_rng: Optional[list] = None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read back: where it is, the learner's state, and the snapshot of its weights."""

    directory: Path
    state: LearnerState
    snapshot: SnapshotInfo


class CheckpointStore:
    """The checkpoints of one job's learner on the shared volume."""

    def __init__(self, root: str | Path) -> None:
        self.base = Path(root) / "checkpoints"

    def directory(self, step: int) -> Path:
        return self.base / f"step-{step}"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint directory, oldest first."""
        if not self.base.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.base.iterdir() if (m := _STEP_DIR.match(p.name)))

    def save(self, state: LearnerState, snapshot: SnapshotInfo, write_into: Callable[[Path], None]) -> Path:
        """Write checkpoint `state.step` atomically (`write_into(tmpdir)` adds the backend's files),
        point LATEST at it, and drop all but the newest CHECKPOINTS_KEPT."""
        final = self.directory(state.step)
        with atomic_dir(final) as tmp:
            write_into(tmp)
            saved = asdict(state) | {"weights": snapshot.path, "checksum": snapshot.checksum}
            (tmp / STATE).write_text(json.dumps(saved))
            fault_point("checkpoint-write")
        atomic_write_text(self.base / LATEST, final.name)
        for old in self.steps()[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(self.directory(old), ignore_errors=True)
        return final

    def _read(self, directory: Path) -> Checkpoint:
        saved = json.loads((directory / STATE).read_text())
        weights, checksum = saved.pop("weights"), saved.pop("checksum")
        state = LearnerState(**saved)
        return Checkpoint(directory, state, SnapshotInfo(version_of(weights), weights, checksum))

    def candidates(self) -> list[Path]:
        """Checkpoint directories to try, best first: the one LATEST names, then the others newest first."""
        named = []
        latest = self.base / LATEST
        if latest.is_file():
            named.append(self.base / latest.read_text().strip())
        return named + [self.directory(s) for s in reversed(self.steps()) if self.directory(s) not in named]

    def readable(self) -> Iterator[Checkpoint]:
        """The checkpoints whose state can be read, best first (a caller that fails to load one's
        files takes the next)."""
        for directory in self.candidates():
            try:
                yield self._read(directory)
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("checkpoint %s cannot be read (%s); trying the one before it", directory, err)

    def load(self) -> Optional[Checkpoint]:
        """The newest checkpoint that can be read (None: nothing to resume from)."""
        return next(self.readable(), None)

    def exists(self) -> bool:
        return (self.base / LATEST).is_file()
