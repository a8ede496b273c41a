"""The learner's weight publishing: snapshot → checkpoint → ack → announce → prune.

Generators only ever see durable weights: a snapshot is written (storage.atomic_dir) before it is
announced, and rollouts are acked only once the checkpoint covering their step is durable. Around
that core, what the volume and the generators need from the learner:
  * room: when the volume's free space is below what the last snapshot took, old snapshots are
    pruned before the new one is written (not only after);
  * a full disk: the error says so and what to do; nothing already checkpointed is touched (the
    write is atomic) and the learner exits to be restarted from its checkpoint;
  * repair: a live generator that reports it refused the announced snapshot, when the snapshot is
    damaged here too, gets it written again (a generator retries refused snapshots, refusals.py).

A mixin of `learner.Learner` (it uses the learner's state, backend, intake, link and clock), kept
in its own module so the learner's loop reads top to bottom.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import time
from pathlib import Path

from safetensors.numpy import save_file as save_numpy

from .faults import fault_point
from .kv import BUS_ERRORS, JobKV
from .messages import WeightsAnnouncement
from .replay_sampling import rng_state
from .snapshots import SnapshotError, SnapshotInfo, prune_snapshots, snapshot_dir, verify_snapshot, write_snapshot

log = logging.getLogger("asyncrlhf.learner")
REWARD_HEAD = "reward_head.safetensors"


class DiskFullError(OSError):
    """The shared volume is full: a restart from the checkpoint follows, but space must be made."""


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0


class WeightPublishing:
    # --- snapshots -----------------------------------------------------------------------

    def checkpoint_due(self, step: int) -> bool:
        """Is the snapshot of `step` also a checkpoint? Every checkpointEverySteps, and the last step."""
        return step % self.checkpoint_every == 0 or step >= self.spec.learner.total_steps

    async def publish_weights(self) -> None:
        """Snapshot → checkpoint → ack → announce: generators only ever see durable weights."""
        version = self.state.step
        await self._make_room()
        try:
            info = await asyncio.to_thread(write_snapshot, self.root, version, self._save_snapshot_files)
            self.telemetry.snapshot_bytes.set(tree_bytes(Path(info.path)))
            self.state.published_version = version
            self.state.last_snapshot = info.path
            self.state.elapsed = self.elapsed()
            self._started = time.monotonic()
            if self.checkpoint_due(version):  # else the held rollouts wait (deadlines extended) for the next one
                await asyncio.to_thread(self.save_checkpoint, info)
                await self.intake.ack_held()
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DiskFullError(err.errno, f"the shared volume {self.root} is full ({err}): free space, or give "
                                    "the job a larger volume (weightSync.size) or fewer snapshots "
                                    "(weightSync.keepSnapshots); sizes per model in docs/tuning.md") from err
            raise
        if self.replay is not None:
            self.replay.mark_sync()
        await self.link.announce(WeightsAnnouncement(version=version, path=info.path, checksum=info.checksum))
        await self.prune(self.link.kv)

    def _save_snapshot_files(self, directory: Path) -> dict[str, str]:
        """A complete HF model directory: the weights, config, generation config and tokenizer."""
        digests = self.backend.save_weights(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        return digests

    async def _make_room(self) -> None:
        """Prune before writing when the volume's free space is below the last snapshot's size."""
        if not self.state.last_snapshot or self.link.kv is None:
            return
        needed = tree_bytes(Path(self.state.last_snapshot))
        if shutil.disk_usage(self.root).free < needed:
            log.warning("the volume has less free space than a snapshot takes (%.2f GiB): pruning first", needed / 2**30)
            await self.prune(self.link.kv)

    # --- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, snapshot: SnapshotInfo) -> None:
        if self.replay is not None:
            self.state.replay = self.replay.state_dict()
            self.state.replay_rng = rng_state(self._replay_rng)
        self.checkpoints.save(self.state, snapshot, self._write_checkpoint_files)

    def _write_checkpoint_files(self, directory: Path) -> None:
        self.backend.save_state(directory)
        if self.head is not None:
            save_numpy(self.head.head.state_dict(), str(directory / REWARD_HEAD))

    # --- pruning and repair --------------------------------------------------------------

    async def prune(self, kv: JobKV) -> None:
        """Delete old snapshots, sparing the published one, the checkpoint's and those live generators use."""
        in_use = {self.state.published_version}
        now = time.time()
        try:
            reports = await kv.reports()
            await kv.fold_retired(reports, now)
        except BUS_ERRORS as err:
            log.warning("not pruning snapshots this time: cannot read the generators' versions: %s", err)
            return
        # a generator gone for good no longer holds its version's snapshot
        in_use |= {status.policy_version for status in reports.values() if status.fresh(now)}
        if (checkpoint := self.checkpoints.load()) is not None:
            in_use.add(checkpoint.snapshot.version)
        fault_point("prune")
        prune_snapshots(self.root, self.spec.weight_sync.keep_snapshots, in_use)

    async def repair_refused(self) -> bool:
        """A live generator refused the announced snapshot and it is damaged here too: write it
        again (the same step's weights) and announce it. True when it did."""
        ann = self.link.announced
        if ann is None or ann.version != self.state.step:  # weights moved on: the next publish replaces it
            return False
        try:
            reports = await self.link.kv.reports()
        except BUS_ERRORS:
            return False
        now = time.time()
        if not any(r.fresh(now) and r.refused_checksum == ann.checksum for r in reports.values()):
            return False
        try:
            await asyncio.to_thread(verify_snapshot, snapshot_dir(self.root, ann.version), ann.checksum, ann.version)
            return False  # sound here: the generator's read failed, and it retries by itself
        except SnapshotError as err:
            log.error("a generator refused snapshot v%d, which is damaged here too (%s): writing it again",
                      ann.version, err)
        await self.publish_weights()
        return True
