"""The learner: feed prompts ahead, assemble each step's batch from the bus, train, publish weights.

The loop of the Async RLHF paper, made durable — release → collect → train → record → publish:
  * Batch b's prompts are released once a snapshot of version >= b - N is announced, each tagged
    `min_version = b - N` (feeding.py, schedule.py); generators answer with at least that version,
    so every rollout used at step b is at most N versions old (N = async.maxStaleness; 0 in sync
    mode). The paper's loop (N=1): while the learner trains step b on rollouts of θ_{b-1},
    generators already answer batch b+1 with θ_b.
  * Step b trains on exactly batch b's groups (in prompt order), so runs are reproducible and
    `mode: sync` is the same computation as `maxStaleness: 0`.
  * Rollouts are acked only after the checkpoint that includes their step is durable (intake.py,
    checkpoints.py). A redelivery after a crash belongs to a batch the checkpoint already trained
    on (batch < step) and is skipped: a learner killed at any moment resumes with no rollout lost
    and none trained on twice. The state stays O(1) in the run's length; which rollout each step
    used is written to `ledger.jsonl` next to the metrics (runlog.py).
  * A rollout older than N versions (possible only if a generator ignores `min_version`) is
    dropped — acked, counted — and its prompt is released again.
  * Publishing (snapshot → checkpoint → ack → announce → prune, room on the volume, repairing a
    snapshot a generator refused) is publishing.py; the bus side is learner_link.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Optional

import nats
from safetensors.numpy import load_file as load_numpy

from . import shutdown
from .api import JobSpec
from .backends import TrainingBackend, make_backend, to_batch
from .bus import GENERATORS_CONSUMER, LEARNER_CONSUMER, JobBus, close_quietly, connect, keep_alive
from .checkpoints import Checkpoint, CheckpointStore, LearnerState
from .evaluation import Evaluator
from .export import snapshot_tokenizer
from .faults import fault_point
from .feeding import PromptFeeder
from .intake import RolloutIntake, TokenLimits, fetch_batch
from .identity import claim_volume
from .learner_link import LearnerLink
from .messages import (
    LEARNER_HEARTBEAT_SECONDS, LearnerProgress, MessageError, Preference, RolloutGroup, WeightsAnnouncement,
)
from .models import resolve_model
from .replay import ReplayBuffer, replay_enabled
from .publishing import REWARD_HEAD, WeightPublishing
from .replay_sampling import set_rng_state, store_and_sample
from .rewards import HeadLearner
from .runlog import RunLog, metrics_row, progress_report
from .sizing import checkpoint_every_steps
from .storage import remove_stale_tmp
from .telemetry import LearnerTelemetry
from .tracking import open_trackers

log = logging.getLogger("asyncrlhf.learner")


class Learner(WeightPublishing):
    def __init__(self, spec: JobSpec, bus: JobBus, nats_url: str, root: str, run_dir: str,
                 backend: TrainingBackend, *, model_path: str = "", head: Optional[HeadLearner] = None) -> None:
        """Assembles the parts; no I/O (see `create`, which loads the models and restores)."""
        self.spec, self.bus, self.nats_url = spec, bus, nats_url
        self.root, self.backend, self.model_path, self.head = Path(root), backend, model_path, head
        self.k = spec.weight_sync.every_steps
        # checkpoints (optimizer state: 4-6x a snapshot's bytes) come every C steps (sizing.py)
        self.checkpoint_every = checkpoint_every_steps(spec, backend.parameter_count)
        self.state = LearnerState()  # shared with the feeder and the intake (restore updates it in place)
        self.checkpoints = CheckpointStore(root)
        self.log = RunLog(run_dir)
        self.feeder = PromptFeeder(spec, bus, self.state)
        self.intake = RolloutIntake(self.state, spec.learner.prompts_per_step, spec.async_.effective_staleness,
                                    spec.learner.total_steps, self._dead_letter,
                                    TokenLimits(backend.vocab_size, backend.max_positions),
                                    fetch_batch(spec.nats.max_message_bytes))
        self.link = LearnerLink(spec, bus, self.feeder, self.intake)
        buffer_spec = spec.async_.replay_buffer
        self.replay = ReplayBuffer.from_spec(buffer_spec) if replay_enabled(buffer_spec, spec.algorithm.loss) else None
        self._replay_rng = random.Random(spec.learner.seed)
        self.stopping = asyncio.Event()
        # The training clock starts when the first batch is complete (engine start-up is not
        # training time, and is the same in sync and async mode); a resumed learner's clock runs
        # from its start, so recovery time counts.
        self._started: Optional[float] = None
        self.evaluator: Optional[Evaluator] = None  # spec.eval (evaluation.py); made by create
        self.tokenizer = None  # saved into every snapshot (export.py); loaded by create
        self.telemetry = LearnerTelemetry(bus.job, bus.namespace, self.state, spec.algorithm.samples_per_prompt,
                                          spec.learner.total_steps)  # served by main_async (telemetry.py)
        self._row: Optional[dict] = None  # the last step's metrics row (what a heartbeat reports)
        self._progress_lock = asyncio.Lock()  # one progress write at a time: none lands after the final one

    @classmethod
    def create(cls, spec: JobSpec, bus: JobBus, nats_url: str, root: str, run_dir: str) -> "Learner":
        """Load the models, build the backend, and restore the newest checkpoint if there is one."""
        model_path = resolve_model(spec.model.policy)
        reference = resolve_model(spec.model.reference) if spec.model.reference else model_path
        head = HeadLearner(spec) if spec.task.reward.kind == "onepass" else None
        learner = cls(spec, bus, nats_url, root, run_dir, make_backend(spec, model_path, reference),
                      model_path=model_path, head=head)
        remove_stale_tmp(learner.root / "snapshots", learner.checkpoints.base)  # left by a writer killed mid-write
        learner.restore()
        learner.tokenizer = snapshot_tokenizer(spec, model_path)
        learner.evaluator = Evaluator.create(spec, model_path, reference, run_dir)
        learner.log.trackers = open_trackers(spec, run_dir, bus.job, learner.state.step)
        return learner

    # --- restore -------------------------------------------------------------------------

    def restore(self) -> None:
        checkpoint = self.checkpoints.load()
        if checkpoint is None:
            return
        self._load(checkpoint)
        log.info("resumed from %s at step %d", checkpoint.directory, self.state.step)

    def _load(self, cp: Checkpoint) -> None:
        vars(self.state).update(vars(cp.state))
        self.feeder.mark_all_again()  # the bus may have lost what was released (a new NATS, `run --resume`)
        if self.replay is not None and self.state.replay is not None:
            self.replay.load_state_dict(self.state.replay)
            set_rng_state(self._replay_rng, self.state.replay_rng)
        if self.head is not None:
            self.head.head.load_state_dict(load_numpy(str(cp.directory / REWARD_HEAD)))
        self.backend.load_weights(Path(cp.snapshot.path))
        self.backend.load_state(cp.directory)
        # announced again when the bus is open (learner_link.LearnerLink.open says why)
        self.link.announced = WeightsAnnouncement(version=self.state.published_version, path=cp.snapshot.path,
                                                  checksum=cp.snapshot.checksum)
        self.log.truncate(self.state.step)
        self._started = time.monotonic()

    # --- the bus -------------------------------------------------------------------------

    async def learn_preferences(self) -> None:
        """One-pass reward head: learn from the labels that arrived, publish θ (acked at checkpoint)."""
        if self.link.preferences is None:
            return
        try:
            msgs = await self.link.preferences.fetch(256, timeout=0.05)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return
        prefs = []
        for m in msgs:
            try:
                prefs.append(Preference.decode(m.data))
            except MessageError as err:
                await self.intake.dead(m, "undecodable preference", str(err))
                continue
            self.intake.hold(f"preference-{m.metadata.sequence.stream}", m)
        await asyncio.to_thread(self.head.learn, prefs)
        await self.link.kv.put_head(self.head.head_message())

    async def _dead_letter(self, msg, reason: str) -> None:
        await self.link.dead_letter(msg, reason)

    async def evaluate(self) -> None:
        """Held-out evaluation of the step's snapshot when spec.eval says so (evaluation.py)."""
        if self.evaluator is None or not self.evaluator.due(self.state.step):
            return
        head = self.head.head_message() if self.head is not None else None
        row = await asyncio.to_thread(self.evaluator.evaluate, self.state.step, self.state.last_snapshot,
                                      self.elapsed(), head)
        if row is not None:
            self.log.metrics(row)

    # --- the loop ------------------------------------------------------------------------

    def replay_sample(self, groups: list[RolloutGroup], step: int) -> list[RolloutGroup]:
        """TBA: store the new completions, train on K per prompt drawn from the buffer."""
        return store_and_sample(self.replay, groups, step, self.spec.algorithm.samples_per_prompt, self._replay_rng)

    async def train_one(self) -> dict:
        """Collect batch `step`, train on it (or on what the replay buffer draws), record it."""
        step = self.state.step
        with self.telemetry.waiting():
            groups = await self.intake.collect(
                self.link.rollouts, step, self.stopping, check_stream=self.on_idle,
                between=self.learn_preferences, on_stale=lambda g: self.link.release_again(g.batch, g.index))
        if self._started is None:
            self._started = time.monotonic()
        started = time.monotonic()
        train_on = self.replay_sample(groups, step) if self.replay is not None else groups
        metrics = await asyncio.to_thread(self.backend.train_step, to_batch(train_on, self.backend.pad_id), step)
        fault_point("after-train")
        if self.replay is not None:
            metrics["replay_items"] = float(len(self.replay))
            metrics["replay_version_mean"] = sum(g.policy_version for g in train_on) / len(train_on)
        self.state.step = step + 1
        self.state.consumed += len(groups)
        row = self.record(step, groups, metrics, time.monotonic() - started)
        self.feeder.forget_before(step + 1)
        return row

    async def on_idle(self) -> None:
        """No rollouts for a while: is the stream lost, or did a generator refuse the announced snapshot?"""
        await self.link.check_stream()
        await self.repair_refused()

    def record(self, step: int, groups: list[RolloutGroup], metrics: dict, step_seconds: float) -> dict:
        stale = [step - g.policy_version for g in groups]
        self.state.staleness_sum += sum(stale)
        self.state.staleness_max = max(self.state.staleness_max, max(stale))
        row = metrics_row(step, groups, metrics, elapsed=self.elapsed(), step_seconds=step_seconds,
                          consumed=self.state.consumed, dropped=self.state.dropped, dead=self.state.dead)
        self.log.metrics(row)
        self.log.ledger(step, groups)
        self.telemetry.observe_step(row, stale, self.state.consumed * self.spec.algorithm.samples_per_prompt
                                    / max(self.elapsed(), 1e-9))
        return row

    def save_checkpoint(self, snapshot) -> None:
        with self.telemetry.checkpointing():
            super().save_checkpoint(snapshot)

    def elapsed(self) -> float:
        return self.state.elapsed + (time.monotonic() - self._started if self._started is not None else 0.0)

    def progress(self, row: Optional[dict], done: bool = False) -> LearnerProgress:
        return progress_report(self.state, self.spec, self.elapsed(), row, done=done,
                               signals=self.telemetry.bus_signals())

    async def put_progress(self, row: Optional[dict], done: bool = False) -> None:
        async with self._progress_lock:
            self._row = row
            await self.link.kv.put_progress(self.progress(row, done), attempts=30 if done else 1)

    async def heartbeat(self) -> None:
        """The progress again every LEARNER_HEARTBEAT_SECONDS, mid-step and while waiting too: the
        autoscaler differentiates its wait and uptime counters (autoscale.observe). Not before a
        resumed learner's first step (its reward is not known yet), nor after the last."""
        while True:
            await asyncio.sleep(LEARNER_HEARTBEAT_SECONDS)
            async with self._progress_lock:
                if self.heartbeat_due():
                    await self.link.kv.put_progress(self.progress(self._row))

    def heartbeat_due(self) -> bool:
        return self.state.step < self.spec.learner.total_steps and (self._row is not None or not self.state.step)

    async def run(self) -> LearnerState:
        nc = await connect(self.nats_url, name="learner")
        try:
            await self.link.open(nc.jetstream(), with_preferences=self.head is not None)
            if self.head is not None:
                await self.link.kv.put_head(self.head.head_message(), attempts=30)
            heartbeat = asyncio.create_task(self.heartbeat())
            try:
                async with keep_alive(self.intake.unacked, self.spec.nats.ack_wait_seconds):
                    await shutdown.unless_stranded(self.loop(), self.stopping, lambda: nc.is_connected)
            finally:
                heartbeat.cancel()
        except (asyncio.CancelledError, shutdown.Stranded):
            log.info("learner stopping at step %d (unacked rollouts will be redelivered)", self.state.step)
        finally:
            self.log.close()
            await close_quietly(nc)
        return self.state

    async def loop(self) -> None:
        total, row = self.spec.learner.total_steps, None
        await self.evaluate()  # the baseline (step 0), or the evaluation a restart cut short
        while self.state.step < total and not self.stopping.is_set():
            await self.link.release_due()
            row = await self.train_one()
            if self.state.step % self.k == 0 or self.state.step == total:
                with self.telemetry.publishing():
                    await self.publish_weights()
                await self.evaluate()
            await self.put_progress(row)
            await self.telemetry.observe_bus(self.link.js, self.bus, GENERATORS_CONSUMER, LEARNER_CONSUMER)
        if self.state.step >= total:
            self.log.finish()  # the trackers' run summary
            await self.put_progress(row, done=True)


async def main_async(spec: JobSpec, bus: JobBus, nats_url: str, root: str, run_dir: str) -> bool:
    """Run the learner; True once every step is trained, False when it was stopped before."""
    # an earlier job's checkpoints under this name: moved aside before anything reads them (a
    # volume the spec names is the user's choice: adopted)
    claim_volume(Path(root), bus.uid, adopt=bool(spec.weight_sync.volume_claim))
    learner = Learner.create(spec, bus, nats_url, root, run_dir)
    shutdown.install(learner.stopping)
    learner.telemetry.serve(spec.metrics.port)
    try:
        return (await learner.run()).step >= spec.learner.total_steps
    finally:
        learner.telemetry.close()
