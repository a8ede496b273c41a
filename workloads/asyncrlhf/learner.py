"""The learner: feed prompts ahead, assemble each step's batch from the bus, train, publish weights.

The loop of the Async RLHF paper, made durable:
  * Batch b's prompts are released once a snapshot of version >= b - N is announced, each tagged
    `min_version = b - N`; generators answer with at least that version, so every rollout used
    at step b is at most N versions old (N = async.maxStaleness; 0 in sync mode). The paper's
    loop (N=1): while the learner trains step b on rollouts of θ_{b-1}, generators already answer
    batch b+1 with θ_b.
  * Step b trains on exactly batch b's groups (in prompt order), so runs are reproducible and
    `mode: sync` is the same computation as `maxStaleness: 0`.
  * Rollouts are acked only after the checkpoint that includes their step is durable. A
    redelivery after a crash belongs to a batch the checkpoint already trained on (batch < step)
    and is skipped: a learner killed at any moment resumes with no rollout lost and none trained
    on twice. The state stays O(1) in the run's length; which rollout each step used is written to
    `ledger.jsonl` next to the metrics (an audit trail, not read back).
  * A rollout older than N versions (possible only if a generator ignores `min_version`) is
    dropped — acked, counted — and its prompt is released again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import nats
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from .api import JobSpec
from .bus import (
    LEARNER_CONSUMER, PROMPTS, REWARD_CONSUMER, WEIGHTS, JobBus, close_quietly, connect, ensure_job_resources,
    keep_alive, publish,
)
from .messages import (
    GENERATOR_FORGET_SECONDS, RETIRED_GENERATORS, Completion, GeneratorStatus, LearnerProgress, Preference, Prompt,
    RolloutGroup, WeightsAnnouncement,
)
from .replay import ReplayBuffer, ReplayItem, replay_enabled
from .rewards import HEAD_KEY, HeadLearner
from .models import resolve_model
from .snapshots import prune_snapshots, write_snapshot
from .tasks import PromptRecord, prompt_stream
from .training import make_backend, to_batch

log = logging.getLogger("asyncrlhf.learner")
CHECKPOINTS_KEPT = 2
STREAM_CHECK_SECONDS = 10.0  # waiting this long for rollouts, the learner checks that its stream is still there
LEDGER = "ledger.jsonl"
GENERATOR_KEY_PREFIX = "generator."  # KV keys of the generators' reports (the generator writes generator.<id>)


@dataclass
class LearnerState:
    """Everything a restarted learner needs besides weights and optimizer (JSON in the checkpoint)."""

    step: int = 0
    published_version: int = 0
    released_through: int = -1
    consumed: int = 0  # rollout groups trained on
    dropped: int = 0
    duplicates: int = 0
    rereleased: dict[str, int] = field(default_factory=dict)  # "batch:index" -> attempts
    staleness_sum: int = 0
    staleness_max: int = 0
    last_snapshot: str = ""
    elapsed: float = 0.0  # training wall-clock before this process (restarts add up)
    replay: Optional[dict] = None  # the replay buffer's state (JSON), when it is used
    replay_rng: Optional[list] = None


class Learner:
    def __init__(self, spec: JobSpec, bus: JobBus, nats_url: str, root: str, run_dir: str,
                 backend=None) -> None:
        self.spec, self.bus, self.nats_url = spec, bus, nats_url
        self.root, self.run_dir = Path(root), Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = resolve_model(spec.model.policy)
        reference = resolve_model(spec.model.reference) if spec.model.reference else self.model_path
        self.backend = backend or make_backend(spec, self.model_path, reference)
        self.n = spec.async_.effective_staleness
        self.k = spec.weight_sync.every_steps
        self.prompts_per_step = spec.learner.prompts_per_step
        self.state = LearnerState()
        self.pending: dict[int, dict[int, tuple[RolloutGroup, object]]] = {}
        self.held: list = []  # msgs consumed since the last checkpoint: acked after it
        self.stopping = asyncio.Event()
        buffer_spec = spec.async_.replay_buffer
        self.replay = ReplayBuffer.from_spec(buffer_spec) if replay_enabled(buffer_spec, spec.algorithm.loss) else None
        self._replay_rng = random.Random(spec.learner.seed)
        self.head = HeadLearner(spec) if spec.task.reward.kind == "onepass" else None
        self._pref_sub = None
        self._kv = None
        self._records: list[PromptRecord] = []  # the prompts of batches _records_base, _records_base + 1, ...
        self._records_base = 0
        self._stream = prompt_stream(spec.task.prompts, spec.learner.seed)
        # The training clock starts when the first batch is complete (engine start-up is not
        # training time, and is the same in sync and async mode); a resumed learner's clock runs
        # from its start, so recovery time counts.
        self._started: Optional[float] = None
        self._stream_created = None
        self._recreating = False
        # the newest snapshot announced (restored: the checkpoint's, announced again at start)
        self._announced: Optional[WeightsAnnouncement] = None
        self.restore()

    # --- prompts -------------------------------------------------------------------------

    def batch_records(self, b: int) -> list[PromptRecord]:
        """Batch b's prompts (b >= the current step: earlier batches are forgotten)."""
        per = self.prompts_per_step
        if b < self._records_base:
            raise IndexError(f"batch {b} was trained on and forgotten (oldest kept: {self._records_base})")
        if self._records_base == 0 and not self._records and self.state.step:  # resumed: skip what was used
            self._records_base = self.state.step
            for _ in itertools.islice(self._stream, self.state.step * per):
                pass
        need = (b + 1 - self._records_base) * per
        if len(self._records) < need:
            self._records.extend(itertools.islice(self._stream, need - len(self._records)))
        return self._records[(b - self._records_base) * per : need]

    def forget_before(self, step: int) -> None:
        """Drop what only batches before `step` needed: memory stays flat however long the run."""
        if step > self._records_base:
            drop = min(len(self._records), (step - self._records_base) * self.prompts_per_step)
            del self._records[:drop]
            self._records_base += drop // self.prompts_per_step
        self.state.rereleased = {k: v for k, v in self.state.rereleased.items() if int(k.split(":")[0]) >= step}

    async def release_prompts(self, js) -> None:
        st = self.state
        for b in release_range(st.published_version, self.n, st.released_through, self.spec.learner.total_steps):
            # all prompts of a batch at once, so a generator gets them in one fetch (one engine call)
            await asyncio.gather(*(
                self._publish_prompt(js, b, i, rec, max(0, b - self.n))
                for i, rec in enumerate(self.batch_records(b))
            ))
            self.state.released_through = b

    def release_again(self) -> None:
        """Mark every batch not trained on yet as unreleased, for release_prompts to publish again:
        where the bus still has them the publish is de-duplicated (same ids), and rollouts that
        arrive twice are skipped as filling a slot twice."""
        self.state.released_through = min(self.state.released_through, self.state.step - 1)

    async def _publish_prompt(self, js, b, i, rec, min_version, attempt=0) -> None:
        pid = f"{self.bus.job}-p{b}-{i}" + (f"-r{attempt}" if attempt else "")
        msg = Prompt(id=pid, batch=b, index=i, text=rec.text, answer=rec.answer, attempt=attempt,
                     samples=self.spec.algorithm.samples_per_prompt, min_version=min_version)
        await publish(js, self.bus.subject(PROMPTS), msg.encode(), msg_id=msg.id,
                      recreate=lambda: self.check_stream(js))

    # --- rollouts ------------------------------------------------------------------------

    async def collect(self, js, sub, step: int) -> list[RolloutGroup]:
        """Pull until every group of batch `step` is here; keep later batches pending."""
        idle_since = time.monotonic()
        while len(self.pending.get(step, {})) < self.prompts_per_step:
            if self.stopping.is_set():
                raise asyncio.CancelledError
            try:
                msgs = await sub.fetch(64, timeout=0.5)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                msgs = []
            except nats.errors.Error as err:  # no consumer (the stream is gone), the bus away, ...
                log.warning("cannot pull rollouts: %s", err)
                await asyncio.sleep(1.0)
                await self.check_stream(js)
                continue
            if msgs:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > STREAM_CHECK_SECONDS:
                idle_since = time.monotonic()
                await self.check_stream(js)
            for msg in msgs:
                await self.accept(js, msg, step)
            await self.learn_preferences()
        slots = self.pending.pop(step)
        groups = [slots[i][0] for i in range(self.prompts_per_step)]
        self.held.extend(slots[i][1] for i in range(self.prompts_per_step))
        return groups

    async def check_stream(self, js) -> None:
        """Waiting long for rollouts: is the stream still the one the prompts went to? A stream
        deleted or recreated (NATS storage lost) lost the released prompts: recreate what is
        missing and release every batch not yet trained on again."""
        try:
            created = (await js.stream_info(self.bus.stream)).created
        except nats.js.errors.NotFoundError:
            created = None
        except (nats.errors.Error, asyncio.TimeoutError):
            return  # the bus is away: nothing to conclude
        if (created is not None and created == self._stream_created) or self._recreating:
            return
        self._recreating = True
        try:
            await self._recreate_stream(js, created)
        finally:
            self._recreating = False

    async def _recreate_stream(self, js, created) -> None:
        log.warning("the job's stream was %s; releasing batches %d.. again",
                    "deleted" if created is None else "recreated", self.state.step)
        await ensure_job_resources(js, self.bus, self.spec.nats.max_bytes, self.spec.nats.ack_wait_seconds)
        self._stream_created = (await js.stream_info(self.bus.stream)).created
        self.held.clear()  # their acks went with the old stream (the rollouts pending are still good)
        if self._announced is not None:  # generators find the weights through the stream too
            await self.announce(js, self._announced)
        self.release_again()
        await self.release_prompts(js)

    async def accept(self, js, msg, step: int) -> None:
        group = RolloutGroup.decode(msg.data)
        slot = self.pending.setdefault(group.batch, {})
        verdict = classify(group, step, self.n, slot)
        if verdict == "keep":
            slot[group.index] = (group, msg)
            return
        await msg.ack()
        if verdict == "duplicate":
            self.state.duplicates += 1
        else:
            self.state.dropped += 1
            await self._rerelease(js, group)

    async def _rerelease(self, js, group: RolloutGroup) -> None:
        key = f"{group.batch}:{group.index}"
        attempt = self.state.rereleased.get(key, 0) + 1
        self.state.rereleased[key] = attempt
        rec = self.batch_records(group.batch)[group.index]
        log.warning("dropped rollout %s (v%d, too stale); releasing its prompt again", group.id, group.policy_version)
        await self._publish_prompt(js, group.batch, group.index, rec, self.state.published_version, attempt)

    async def learn_preferences(self) -> None:
        """One-pass reward head: learn from the labels that arrived, publish θ (acked at checkpoint)."""
        if self._pref_sub is None:
            return
        try:
            msgs = await self._pref_sub.fetch(256, timeout=0.05)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return
        await asyncio.to_thread(self.head.learn, [Preference.decode(m.data) for m in msgs])
        self.held.extend(msgs)
        await put_soon(self._kv, HEAD_KEY, self.head.head_message())

    def replay_sample(self, groups: list[RolloutGroup], step: int) -> list[RolloutGroup]:
        """TBA: store the new completions, then train on K per prompt drawn from the buffer
        (within a prompt: from the items added since the last sync with probability m, see replay.py)."""
        for g in groups:
            for c in g.completions:
                self.replay.add(ReplayItem(
                    prompt_id=g.prompt_text, tokens=c.token_ids, score=c.score, policy_version=g.policy_version,
                    payload={"prompt_token_ids": g.prompt_token_ids, "completion": c.model_dump()},
                ))
        # training prompts: each slot keeps this step's prompt with probability m, else takes a
        # prompt drawn uniformly from everything stored (old prompts get replayed)
        rng, m = self._replay_rng, self.replay.recency_probability
        stored = self.replay.prompts()
        chosen = [g.prompt_text if rng.random() < m else rng.choice(stored) for g in groups]
        drawn = self.replay.sample(prompt_ids=chosen, k=self.spec.algorithm.samples_per_prompt, rng=rng)
        return [
            RolloutGroup(
                id=f"replay-{step}-{i}", prompt_id=str(items[0].prompt_id), batch=step, index=i,
                prompt_text=str(items[0].prompt_id), prompt_token_ids=items[0].payload["prompt_token_ids"],
                completions=[Completion(**item.payload["completion"]) for item in items],
                policy_version=min(item.policy_version for item in items), generator_id="replay",
            )
            for i, items in enumerate(drawn)
        ]

    def unacked(self) -> list:
        """Every message this learner holds: pending for a later step, or used but not checkpointed."""
        return [msg for slots in self.pending.values() for _, msg in slots.values()] + self.held

    # --- snapshots and checkpoints -------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.root / "checkpoints" / f"step-{step}"

    def save_checkpoint(self, info) -> None:
        step = self.state.step
        final = self.checkpoint_dir(step)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.backend.save_state(tmp)
        if self.head is not None:
            save_numpy(self.head.head.state_dict(), str(tmp / "reward_head.safetensors"))
        if self.replay is not None:
            self.state.replay = self.replay.state_dict()
            self.state.replay_rng = list(self._replay_rng.getstate())
        state = asdict(self.state) | {"weights": info.path, "checksum": info.checksum}
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest = self.root / "checkpoints" / "LATEST"
        (latest.with_suffix(".tmp")).write_text(final.name)
        os.replace(latest.with_suffix(".tmp"), latest)
        for old in sorted(self.root.glob("checkpoints/step-*"), key=lambda p: int(p.name[5:]))[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self) -> None:
        latest = self.root / "checkpoints" / "LATEST"
        if not latest.exists():
            return
        directory = self.root / "checkpoints" / latest.read_text().strip()
        saved = json.loads((directory / "state.json").read_text())
        weights = saved.pop("weights")
        checksum = saved.pop("checksum")
        if isinstance(saved.get("consumed"), list):  # checkpoints of 0.1.x kept every id
            saved["consumed"] = len(saved["consumed"])
        self.state = LearnerState(**saved)
        self.release_again()  # the bus may have lost what was released (a new NATS, `run --resume`)
        if self.replay is not None and self.state.replay is not None:
            self.replay.load_state_dict(self.state.replay)
            version, internal, gauss = self.state.replay_rng
            self._replay_rng.setstate((version, tuple(internal), gauss))
        if self.head is not None:
            self.head.head.load_state_dict(load_numpy(str(directory / "reward_head.safetensors")))
        self.backend.load_weights(Path(weights))
        self.backend.load_state(directory)
        # killed between this checkpoint and its announcement, the snapshot was never announced;
        # generators waiting for it would wait for ever (sync mode): announce it again at start
        # (the same message id: a no-op when it did go out)
        self._announced = WeightsAnnouncement(version=self.state.published_version, path=weights, checksum=checksum)
        self._truncate_metrics(self.state.step)
        self._truncate_ledger(self.state.step)
        self._started = time.monotonic()
        log.info("resumed from %s at step %d", directory, self.state.step)

    def _truncate_metrics(self, step: int) -> None:
        truncate_jsonl(self.run_dir / "metrics.jsonl", step)

    def _truncate_ledger(self, step: int) -> None:
        truncate_jsonl(self.run_dir / LEDGER, step)

    def write_ledger(self, step: int, groups: list[RolloutGroup]) -> None:
        """Which rollout groups step `step` trained on: id, generator, policy version."""
        line = {"step": step + 1, "rollouts": [[g.id, g.generator_id, g.policy_version] for g in groups]}
        with open(self.run_dir / LEDGER, "a") as handle:
            handle.write(json.dumps(line, separators=(",", ":")) + "\n")

    async def publish_weights(self, js, kv) -> None:
        """Snapshot → checkpoint → ack → announce: generators only ever see durable weights."""
        version = self.state.step
        tokenizer_files = [p for p in Path(self.model_path).glob("*") if "token" in p.name]
        info = await asyncio.to_thread(
            write_snapshot, self.root, version, self.backend.save_weights, tokenizer_files
        )
        self.state.published_version = version
        self.state.last_snapshot = info.path
        self.state.elapsed = self.elapsed()
        self._started = time.monotonic()
        await asyncio.to_thread(self.save_checkpoint, info)
        for msg in self.held:
            try:
                await msg.ack()
            except (nats.errors.Error, asyncio.TimeoutError) as err:  # redelivered later, then skipped
                log.warning("could not ack a rollout (it will come back and be skipped): %s", err)
        self.held.clear()
        if self.replay is not None:
            self.replay.mark_sync()
        await self.announce(js, WeightsAnnouncement(version=version, path=info.path, checksum=info.checksum))
        await self._prune(kv)

    async def announce(self, js, ann: WeightsAnnouncement) -> None:
        self._announced = ann
        await publish(js, self.bus.subject(WEIGHTS), ann.encode(), msg_id=f"w-{ann.version}-{ann.checksum[:16]}",
                      recreate=lambda: self.check_stream(js))

    async def _prune(self, kv) -> None:
        in_use = {self.state.published_version}
        now = time.time()
        try:
            reports = await generator_reports(kv)
            await forget_gone_generators(kv, reports, now)
        except (nats.errors.Error, asyncio.TimeoutError) as err:
            log.warning("not pruning snapshots this time: cannot read the generators' versions: %s", err)
            return
        for status in reports.values():
            if status.fresh(now):  # a generator gone for good no longer holds its version's snapshot
                in_use.add(status.policy_version)
        latest = self.root / "checkpoints" / "LATEST"
        if latest.exists():
            saved = json.loads((self.root / "checkpoints" / latest.read_text().strip() / "state.json").read_text())
            in_use.add(int(Path(saved["weights"]).name[1:]))
        prune_snapshots(self.root, self.spec.weight_sync.keep_snapshots, in_use)

    # --- the loop ------------------------------------------------------------------------

    def record(self, step: int, groups: list[RolloutGroup], metrics: dict, step_seconds: float) -> dict:
        scores = [c.score for g in groups for c in g.completions]
        stale = [step - g.policy_version for g in groups]
        self.state.staleness_sum += sum(stale)
        self.state.staleness_max = max(self.state.staleness_max, max(stale))
        row = {
            "step": step + 1, "time": round(self.elapsed(), 3),
            "reward_mean": sum(scores) / len(scores),
            "eos_fraction": sum(c.eos for g in groups for c in g.completions) / len(scores),
            "staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale),
            "policy_versions": sorted({g.policy_version for g in groups}),
            "samples": len(scores), "step_seconds": round(step_seconds, 4),
            "consumed": self.state.consumed, "dropped": self.state.dropped,
            **{k: round(v, 6) for k, v in metrics.items()},
        }
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        return row

    def elapsed(self) -> float:
        return self.state.elapsed + (time.monotonic() - self._started if self._started is not None else 0.0)

    def progress(self, row: Optional[dict], done: bool = False, failed: str = "") -> LearnerProgress:
        st = self.state
        consumed = st.consumed
        elapsed = self.elapsed()
        samples = consumed * self.spec.algorithm.samples_per_prompt
        return LearnerProgress(
            step=st.step, total_steps=self.spec.learner.total_steps, policy_version=st.published_version,
            rollouts_consumed=consumed, rollouts_dropped=st.dropped, duplicates_skipped=st.duplicates,
            staleness_mean=st.staleness_sum / max(1, consumed), staleness_max=st.staleness_max,
            reward_mean=row["reward_mean"] if row else None,
            samples_per_second=samples / elapsed if elapsed > 0 else 0.0,
            last_snapshot=st.last_snapshot, done=done, failed=failed,
        )

    async def run(self) -> LearnerState:
        nc = await connect(self.nats_url, name="learner")
        js = nc.jetstream()
        await ensure_job_resources(js, self.bus, self.spec.nats.max_bytes, self.spec.nats.ack_wait_seconds)
        self._stream_created = (await js.stream_info(self.bus.stream)).created
        kv = await js.key_value(self.bus.bucket)
        sub = await js.pull_subscribe_bind(LEARNER_CONSUMER, self.bus.stream)
        if self._announced is not None:  # restored: see restore()
            await self.announce(js, self._announced)
        if self.head is not None:
            self._kv = kv
            self._pref_sub = await js.pull_subscribe_bind(REWARD_CONSUMER, self.bus.stream)
            await kv.put(HEAD_KEY, self.head.head_message())
        try:
            async with keep_alive(self.unacked, self.spec.nats.ack_wait_seconds):
                await self.loop(js, sub, kv)
        except asyncio.CancelledError:
            log.info("learner stopping at step %d (unacked rollouts will be redelivered)", self.state.step)
        finally:
            await close_quietly(nc)
        return self.state

    async def loop(self, js, sub, kv) -> None:
        total = self.spec.learner.total_steps
        row = None
        while self.state.step < total and not self.stopping.is_set():
            await self.release_prompts(js)
            step = self.state.step
            groups = await self.collect(js, sub, step)
            if self._started is None:
                self._started = time.monotonic()
            started = time.monotonic()
            train_on = self.replay_sample(groups, step) if self.replay is not None else groups
            metrics = await asyncio.to_thread(self.backend.train_step, to_batch(train_on, self.backend.pad_id), step)
            if self.replay is not None:
                metrics["replay_items"] = float(len(self.replay))
                metrics["replay_version_mean"] = sum(g.policy_version for g in train_on) / len(train_on)
            self.state.step = step + 1
            self.state.consumed += len(groups)
            row = self.record(step, groups, metrics, time.monotonic() - started)
            self.write_ledger(step, groups)
            self.forget_before(step + 1)
            if self.state.step % self.k == 0 or self.state.step == total:
                await self.publish_weights(js, kv)
            await put_soon(kv, "learner", self.progress(row).encode())
        if self.state.step >= total:
            await put_soon(kv, "learner", self.progress(row, done=True).encode(), attempts=30)


async def put_soon(kv, key: str, value: bytes, attempts: int = 1) -> bool:
    """A KV put that a bus hiccup does not turn into a crash: progress and the reward head are
    written again at the next step. `attempts` > 1 retries once a second (the final progress)."""
    for attempt in range(attempts):
        try:
            await kv.put(key, value)
            return True
        except (nats.errors.Error, asyncio.TimeoutError) as err:
            log.warning("could not write %s to the job's KV bucket (try %d/%d): %s", key, attempt + 1, attempts, err)
            if attempt + 1 < attempts:
                await asyncio.sleep(1.0)
    if attempts > 1:
        raise RuntimeError(f"could not write {key} to the job's KV bucket after {attempts} tries")
    return False


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed learner writes the later ones again)."""
    if not path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with open(path) as src, open(tmp, "w") as dst:
        for line in src:
            if line.strip() and json.loads(line)["step"] <= step:
                dst.write(line if line.endswith("\n") else line + "\n")
    os.replace(tmp, path)


def release_range(published_version: int, max_staleness: int, released_through: int, total_steps: int) -> range:
    """Batches whose prompts may be released now: b <= published + N (and not released yet)."""
    return range(released_through + 1, min(total_steps - 1, published_version + max_staleness) + 1)


def classify(group: RolloutGroup, step: int, max_staleness: int, slot: dict) -> str:
    """'duplicate' (its batch was trained on already, or its slot is filled), 'stale' (older than
    N versions at the step that will use it) or 'keep'. Step b trains exactly batch b, so
    `batch < step` recognises every redelivery of a rollout that was used, with no id list."""
    if group.batch < step or group.index in slot:
        return "duplicate"
    if max(group.batch, step) - group.policy_version > max_staleness:
        return "stale"
    return "keep"


async def generator_reports(kv) -> dict[str, GeneratorStatus]:
    """{KV key: report} of every generator that ever reported (plus the retired summary)."""
    out = {}
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return out
    for key in keys:
        if key.startswith(GENERATOR_KEY_PREFIX):
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # deleted meanwhile
            out[key] = GeneratorStatus.decode(entry.value)
    return out


async def generator_statuses(kv) -> list[GeneratorStatus]:
    return list((await generator_reports(kv)).values())


async def forget_gone_generators(kv, reports: dict[str, GeneratorStatus], now: float) -> None:
    """Fold the reports of generators gone for GENERATOR_FORGET_SECONDS into one summary report
    (their rollouts and tokens still count) and delete them: a long job whose generator pods come
    and go keeps a handful of keys, not one per pod it ever had. `reports` is updated in place.
    (The learner is the only writer; a crash between the put and the deletes counts them twice.)"""
    gone = {key: r for key, r in reports.items()
            if r.generator_id != RETIRED_GENERATORS and now - r.updated > GENERATOR_FORGET_SECONDS}
    if not gone:
        return
    key = GENERATOR_KEY_PREFIX + RETIRED_GENERATORS
    before = reports.get(key) or GeneratorStatus(generator_id=RETIRED_GENERATORS, policy_version=0, updated=0.0)
    retired = before.model_copy(update={
        "rollouts": before.rollouts + sum(r.rollouts for r in gone.values()),
        "tokens": before.tokens + sum(r.tokens for r in gone.values()),
    })
    await kv.put(key, retired.encode())
    reports[key] = retired
    for old in gone:
        await kv.delete(old)
        del reports[old]
    log.info("folded the reports of %d generators gone for good into %s", len(gone), key)


async def main_async(spec: JobSpec, bus: JobBus, nats_url: str, root: str, run_dir: str) -> None:
    learner = Learner(spec, bus, nats_url, root, run_dir)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, learner.stopping.set)
    await learner.run()
