"""The generator: pull prompts, make K completions each with the current weights, score, publish.

Generators are stateless, so any number can run and any one may die: a prompt is acked only after
its rollout group is published, so an unfinished prompt is redelivered to another generator.
Each prompt names the oldest policy version allowed to answer it (`min_version`); a generator
that is behind loads the newest announced snapshot first — that is what bounds staleness.
A generator of a TBA searcher group (`generator.searchers`, named by ASYNCRLHF_SEARCHER) loads new
weights only every `syncEvery` published snapshots (`sync_due`), unless a prompt's bound needs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

import nats

from .api import JobSpec
from . import shutdown
from .bus import (
    GENERATORS_CONSUMER, ROLLOUTS, BusLimitError, JobBus, check_message_size, close_quietly, connect, dead_letter,
    keep_alive, latest_weights, publish_all,
)
from .engines import Engine, make_engine
from .faults import fault_point
from .kv import JobKV
from .messages import (
    GENERATOR_HEARTBEAT_SECONDS, Completion, GeneratorStatus, MessageError, Prompt, RolloutGroup,
    WeightsAnnouncement,
)
from .models import encode_prompt, load_tokenizer, resolve_model
from .probes import STALL_MIN_SECONDS, Probes, serve_probes
from .reward_kinds import OnePassReward, RewardBatch, RewardError, make_reward, prompt_of, score_batch
from .refusals import RefusalLog
from .snapshots import SnapshotError, check_structure, confined
from .telemetry import GeneratorTelemetry

log = logging.getLogger("asyncrlhf.generator")
HEADERS_ALLOWANCE = 1024  # bytes of a message's headers (Nats-Msg-Id: a rollout id, at most 512 characters)
WEIGHTS_WAIT_ACK_WAITS = 3  # waiting longer than this many ack waits for weights, prompts are handed back
WEIGHTS_WAIT_RETRY_SECONDS = 5.0  # ... and redelivered after this delay
HOLD_LIMIT_MIN_SECONDS, HOLD_LIMIT_ACK_WAITS = 1800.0, 30  # a generation holds its prompts at most this long


@dataclass
class GeneratorState:
    version: int = 0
    checksum: str = ""  # of the snapshot loaded ("" = the initial weights)
    rollouts: int = 0
    tokens: int = 0
    samples: int = 0  # completions published
    busy_seconds: float = 0.0
    refusals: RefusalLog = field(default_factory=RefusalLog)  # snapshots that failed, and when to retry
    reward_failures: int = 0  # batches in a row handed back because the reward failed on them


class Generator:
    def __init__(self, spec: JobSpec, bus: JobBus, nats_url: str, generator_id: str,
                 engine: Optional[Engine] = None, fetch_size: Optional[int] = None, snapshot_root: str = "",
                 searcher: str = "") -> None:
        self.spec, self.bus, self.nats_url, self.id = spec, bus, nats_url, generator_id
        self.group = spec.generator.group_named(searcher)  # ValueError for a group the spec does not name
        self.snapshot_root = snapshot_root  # when set, announced snapshots must lie under it
        self.model_path = resolve_model(spec.model.policy)
        self.tokenizer = load_tokenizer(spec.model.tokenizer or self.model_path)
        self.engine = engine or make_engine(spec, self.model_path)
        self.scorer = make_reward(spec)
        self.fetch_size = fetch_size or spec.learner.prompts_per_step
        self.max_payload = spec.nats.max_message_bytes  # the server's own once connected (run)
        self.state = GeneratorState()
        self.stopping = asyncio.Event()
        job, namespace = (bus.job, bus.namespace) if bus is not None else ("", "")  # no bus: a test's engine check
        self.telemetry = GeneratorTelemetry(job, namespace, generator_id, self.state)  # telemetry.py
        # /livez: a loop stalled past one ack wait has lost its prompts' keep-alives (probes.py)
        self.probes = Probes(max(STALL_MIN_SECONDS, spec.nats.ack_wait_seconds), self.hold_limit)
        self.probes.stopping = self.stopping.is_set

    # --- weights -------------------------------------------------------------------------

    def try_reload(self, ann: WeightsAnnouncement) -> bool:
        """Verify and load a snapshot; on any problem keep the current weights, report the refusal
        (the learner writes a damaged snapshot again) and try it again later (refusals.py)."""
        refusals = self.state.refusals
        if not refusals.may_try(ann.checksum, time.monotonic()):
            return False
        fault_point("reload")
        try:
            if self.snapshot_root:
                confined(ann.path, self.snapshot_root)
            check_structure(ann.path, ann.checksum, ann.version)
        except (SnapshotError, OSError) as err:
            return self._refuse(ann, str(err))
        try:
            with self.telemetry.timed(self.telemetry.reload_seconds):
                self.engine.reload(ann.path, ann.checksum)  # every file verified while it is read (once)
        except (SnapshotError, OSError) as err:
            return self._refuse(ann, str(err))
        except Exception as err:  # noqa: BLE001 -- whatever the engine raises, the generator keeps serving
            log.exception("the engine failed to load snapshot v%d", ann.version)
            return self._refuse(ann, f"the engine failed to load it: {type(err).__name__}: {err}")
        refusals.loaded(ann.checksum)
        self.state.version, self.state.checksum = ann.version, ann.checksum
        log.info("generator %s loaded policy v%d", self.id, ann.version)
        return True

    async def reload_latest(self, js, need: int = 0) -> bool:
        """The one way weights change: load the newest announced snapshot when it is not the one
        held (a snapshot is identified by version and checksum: a learner restarted from an older
        checkpoint announces versions again with other weights) and the group's sync is due (or a
        prompt needs at least version `need`). True when weights changed."""
        ann = await latest_weights(js, self.bus)
        if ann is None or ann.checksum == self.state.checksum:
            return False
        gap = self.group.sync_every * self.spec.weight_sync.every_steps
        if not sync_due(self.state.version, ann.version, gap, need):
            return False
        return await asyncio.to_thread(self.try_reload, ann)

    def _refuse(self, ann: WeightsAnnouncement, reason: str) -> bool:
        refusal = self.state.refusals.refuse(ann.version, ann.checksum, reason, time.monotonic())
        log.error("refusing snapshot v%d: %s (keeping v%d; trying it again in %.0f s)", ann.version, reason,
                  self.state.version, refusal.retry_at - time.monotonic())
        return False

    async def sync_weights(self, js, need: int, limit: float = float("inf")) -> bool:
        """Load the newest snapshot until version >= need (True); False when stopping or after
        `limit` seconds (the caller hands its prompts back rather than hold them for ever)."""
        deadline = time.monotonic() + limit
        while True:
            await self.reload_latest(js, need)
            if self.state.version >= need:
                return True
            if self.stopping.is_set() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    # --- work ----------------------------------------------------------------------------

    def _make_groups(self, prompts: list[Prompt]) -> tuple[list[RolloutGroup], int]:
        started = time.monotonic()
        template = self.spec.model.chat_template
        token_prompts = [encode_prompt(self.tokenizer, prompt_of(p), template) for p in prompts]
        # the seed depends on the job's seed and the prompt's place, not on who generates it or when:
        # the same job gives the same samples for the same weights (sync == async with N=0)
        seeds = [zlib.crc32(f"{self.spec.learner.seed}:{p.batch}:{p.index}:{p.attempt}".encode()) for p in prompts]
        samples = self.engine.generate(token_prompts, prompts[0].samples, seeds)
        elapsed = time.monotonic() - started
        fault_point("generate", note=" ".join(p.id for p in prompts))  # the prompts are held, nothing published
        texts = [[self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in group] for group in samples]
        # a reward that fails raises RewardError: nothing is published, the prompts are handed back
        scores = iter(score_batch(self.scorer, RewardBatch.from_prompts(prompts, texts)))
        groups, tokens = [], 0
        for prompt, ids, group, group_texts in zip(prompts, token_prompts, samples, texts):
            completions = [
                Completion(text=text, token_ids=s.token_ids, logprobs=s.logprobs, eos=s.eos, score=next(scores))
                for s, text in zip(group, group_texts)
            ]
            tokens += sum(len(s.token_ids) for s in group)
            groups.append(RolloutGroup(
                id=f"r-{prompt.id}", prompt_id=prompt.id, batch=prompt.batch, index=prompt.index,
                prompt_text=prompt.text, prompt_token_ids=ids, completions=completions,
                policy_version=self.state.version, generator_id=self.id, generation_seconds=elapsed,
            ))
        self.state.busy_seconds += elapsed
        return groups, tokens

    async def _hand_back(self, err: RewardError, msgs: list) -> None:
        """The reward failed on these prompts: redeliver them (to any generator) after a delay that
        doubles with each failure in a row, up to a minute, so a reward server that is down is not
        hammered and a fixed one is used again soon. Nothing is scored 0 and nothing is lost."""
        self.state.reward_failures += 1
        delay = min(60.0, 2.0 ** (self.state.reward_failures - 1))
        log.error("%s -- the %d prompts go back to the queue, retried in %.0f s (failure %d in a row)",
                  err, len(msgs), delay, self.state.reward_failures)
        for m in msgs:
            await m.nak(delay=delay)

    async def report(self, kv: JobKV) -> None:
        st = self.state
        refused = st.refusals.latest
        await kv.put_report(GeneratorStatus(
            generator_id=self.id, policy_version=st.version, rollouts=st.rollouts, tokens=st.tokens,
            tokens_per_second=st.tokens / st.busy_seconds if st.busy_seconds else 0.0,
            refused_version=refused.version if refused else None, refused_checksum=refused.checksum if refused else "",
            refused_reason=refused.reason[:500] if refused else "", **self.telemetry.bus_signals(),
        ))

    async def refresh_head(self, kv: JobKV) -> None:
        """The one-pass reward head's latest θ (the learner process learns it from preferences)."""
        head = await kv.head()
        if head is not None:  # None: no preference seen yet, θ = 0 scores every answer 0
            self.scorer.set_head(head)

    async def handle(self, js, kv: JobKV, msgs: list) -> None:
        # held prompts stay ours while we wait for weights and generate (however long that takes)
        async with keep_alive(lambda: msgs, self.spec.nats.ack_wait_seconds, limit=self.hold_limit):
            with self.probes.working("answering prompts"):
                await self._handle(js, kv, msgs)

    async def _handle(self, js, kv: JobKV, msgs: list) -> None:
        msgs, prompts = await self._decode(js, msgs)
        if not prompts:
            return
        with self.telemetry.timed(self.telemetry.weights_wait):
            synced = await self.sync_weights(js, max(p.min_version for p in prompts), self.weights_wait_limit)
        if not synced:
            # stopping, or the weights it needs are not loadable yet: hand the prompts back (to
            # any generator) instead of holding them for ever
            for m in msgs:
                await m.nak(delay=None if self.stopping.is_set() else WEIGHTS_WAIT_RETRY_SECONDS)
            return
        if isinstance(self.scorer, OnePassReward):
            await self.refresh_head(kv)
        by_k: dict[int, list[int]] = {}  # one engine call per K (a fetch shares K in practice)
        for i, p in enumerate(prompts):
            by_k.setdefault(p.samples, []).append(i)
        for idx in by_k.values():
            try:
                groups, tokens = await asyncio.to_thread(self._make_groups, [prompts[i] for i in idx])
            except RewardError as err:
                await self._hand_back(err, [msgs[i] for i in idx])
                continue
            self.state.reward_failures = 0
            subject = self.bus.subject(ROLLOUTS)

            async def ack(j: int, idx=idx) -> None:  # the prompt's group is stored: its prompt is done
                await msgs[idx[j]].ack()

            encoded = encode_for_bus(groups, self.max_payload)
            stored = await publish_all(js, [(subject, e, g.id) for e, g in zip(encoded, groups)], then=ack)
            self._count([g for g, new in zip(groups, stored) if new], tokens if all(stored) else None)

    def _count(self, groups: list[RolloutGroup], tokens: Optional[int]) -> None:
        """What was published: a group the stream already had (this generator was held past the
        ack wait, e.g. SIGSTOP'd, and another one answered the prompt) is not produced twice."""
        self.state.rollouts += len(groups)
        self.state.samples += sum(len(g.completions) for g in groups)
        self.state.tokens += tokens if tokens is not None else sum(
            len(c.token_ids) for g in groups for c in g.completions)

    async def _decode(self, js, msgs: list) -> tuple[list, list[Prompt]]:
        """The prompts that can be read; the others go to the job's dead letters (never redelivered)."""
        good, prompts = [], []
        for m in msgs:
            try:
                prompts.append(Prompt.decode(m.data))
                good.append(m)
            except MessageError as err:
                log.error("undecodable prompt set aside in the job's dead letters: %s", str(err)[:500])
                await dead_letter(js, self.bus, m, f"undecodable prompt: {err}")
        return good, prompts

    @property
    def hold_limit(self) -> float:
        """The longest a generator keeps prompts (waiting for weights, generating, scoring): past it
        they go to another generator, so a hung engine cannot hold a batch for ever."""
        return max(HOLD_LIMIT_MIN_SECONDS, HOLD_LIMIT_ACK_WAITS * self.spec.nats.ack_wait_seconds)

    @property
    def weights_wait_limit(self) -> float:
        return WEIGHTS_WAIT_ACK_WAITS * self.spec.nats.ack_wait_seconds

    async def run(self) -> GeneratorState:
        nc = await connect(self.nats_url, name=f"generator-{self.id}")
        try:
            check_message_size(nc, self.spec.nats.max_message_bytes)  # before the first rollout is made
        except BusLimitError:
            await nc.close()
            raise
        self.max_payload = nc.max_payload
        self.probes.connected = lambda: nc.is_connected
        js = nc.jetstream()
        kv = await JobKV.open(js, self.bus.bucket)
        sub = await js.pull_subscribe_bind(GENERATORS_CONSUMER, self.bus.stream)
        with self.probes.working("loading weights"):
            await self.reload_latest(js)
        self.probes.weights_checked = True  # ready: the newest weights (or the initial ones, none announced)
        await self.report(kv)
        heartbeat = asyncio.create_task(self._heartbeat(kv))
        try:
            while not self.stopping.is_set():
                try:
                    if await shutdown.unless_stranded(self._step(js, kv, sub), self.stopping, lambda: nc.is_connected):
                        break
                except shutdown.Stranded:
                    break
                except nats.errors.Error as err:
                    # the bus is away (restarting, failing over): the prompts we held come back to
                    # the queue after ackWaitSeconds, so waiting and going on loses nothing and
                    # costs no engine restart (minutes for a large model)
                    log.warning("bus error, retrying in 1 s: %s", err)
                    await asyncio.sleep(1.0)
        finally:
            heartbeat.cancel()
            if nc.is_connected:  # the bus away: the report would wait for it (the report goes stale instead)
                await self.report(kv)
            await close_quietly(nc)
        return self.state

    async def _step(self, js, kv, sub) -> bool:
        """Take prompts and answer them, or, when there are none, pick up new weights; True once
        the learner is done."""
        self.probes.progress()
        fault_point("generator-loop")
        try:
            with self.telemetry.timed(self.telemetry.prompt_wait):
                msgs = await sub.fetch(self.fetch_size, timeout=1.0)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            if await kv.learner_finished():
                return True
            with self.probes.working("loading weights"):
                reloaded = await self.reload_latest(js)
            if reloaded:
                await self.report(kv)
            return False
        if not msgs:  # a fetch can end with only status messages (e.g. its consumer was deleted)
            await asyncio.sleep(0.1)
            return False
        await self.handle(js, kv, msgs)
        await self.report(kv)
        return False

    async def _heartbeat(self, kv) -> None:
        """Report while generating or loading weights too (both run in a thread), so a busy
        generator never looks gone (GeneratorStatus.fresh)."""
        while True:
            await asyncio.sleep(GENERATOR_HEARTBEAT_SECONDS)
            await self.report(kv)


def encode_for_bus(groups: list[RolloutGroup], max_payload: int) -> list[bytes]:
    """The groups' wire form. A group larger than the bus takes (its token texts average more than
    the 12 bytes the spec's cap allows for: spec/rules.py) goes without its completions' texts,
    which the learner does not read (it trains on token ids). One still too large (a prompt of
    more tokens than the cap's 64 KiB allows for) raises BusLimitError: that prompt would come back
    and fail again for ever, so the generator stops with the reason."""
    encoded = []
    for g in groups:
        data = g.encode()
        if len(data) + HEADERS_ALLOWANCE > max_payload:  # max_payload counts the headers (the msg id) too
            full = len(data)
            bare = g.model_copy(update={"completions": [c.model_copy(update={"text": ""}) for c in g.completions]})
            data = bare.encode()
            log.warning("rollout group %s is too large for the bus (%d bytes): sent without its completions' texts "
                        "(%d bytes)", g.id, full, len(data))
        if len(data) + HEADERS_ALLOWANCE > max_payload:
            tokens = sum(len(c.token_ids) for c in g.completions)
            raise BusLimitError(
                f"rollout group {g.id} ({len(g.prompt_token_ids)} prompt tokens, {tokens} generated) is {len(data)} "
                f"bytes even without its texts, more than the bus's largest message ({max_payload} bytes): "
                f"shorten the prompts (task.prompts), lower generator.sampling.maxTokens or "
                f"algorithm.samplesPerPrompt, or raise nats.maxMessageBytes (and the NATS server's max_payload)")
        encoded.append(data)
    return encoded


def sync_due(held: int, newest: int, gap: int, need: int = 0) -> bool:
    """Whether a generator holding version `held` loads the announced `newest` (another snapshot
    than the one held): always when it needs a version it does not have (`need` > held, the
    staleness bound) or the announcement is not newer (a learner restarted from an older
    checkpoint), else once `newest` is `gap` versions ahead (gap = syncEvery x weightSync.everySteps;
    1 x everySteps, the default group, loads every snapshot)."""
    return need > held or newest <= held or newest - held >= gap


async def main_async(spec: JobSpec, bus: JobBus, nats_url: str, generator_id: str, snapshot_root: str = "",
                     searcher: str = "") -> None:
    gen = Generator(spec, bus, nats_url, generator_id, snapshot_root=snapshot_root, searcher=searcher)
    if gen.group.name:
        log.info("generator %s is a searcher of group %s: it loads every %d-th snapshot", generator_id,
                 gen.group.name, gen.group.sync_every)
    shutdown.install(gen.stopping)
    gen.telemetry.serve(spec.metrics.port)
    probes = serve_probes(gen.probes, os.environ)  # the engine is loaded: /readyz and /livez answer from now on
    try:
        state = await gen.run()
    finally:
        gen.telemetry.close()
        if probes is not None:
            probes.close()
    log.info("generator %s done: %d rollout groups, %d tokens", generator_id, state.rollouts, state.tokens)
