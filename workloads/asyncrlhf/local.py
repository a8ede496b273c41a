"""`asyncrlhf run`: the cluster job on one machine.

The same manifest, the same generator and learner programs a cluster runs, as local processes:
an embedded nats-server (unless spec.nats.url is set), `generator.replicas` generator processes,
a learner of `learner.nodes * learner.processesPerNode` processes (ranks on 127.0.0.1, as torchrun
would start them), and a shared snapshot directory under `runs/<job>/volume`. The runner restarts
the learner when any of its processes dies — all its processes, since the others are stuck in
collectives with the dead one; it resumes from its checkpoint — up to `learner.backoffLimit`, and
a generator that dies (generators are stateless). It prints live progress and ends with a report.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from .api import AsyncRLHFJob
from .bus import WEIGHTS, JobBus, close_quietly, connect, ensure_job_resources
from .checkpoints import CheckpointStore
from .console import Console, Failure, Observed, StartupWatch, scale_line
from .kv import BUS_ERRORS, JobKV
from .local_autoscale import LocalAutoscaler, generator_slots
from .local_generators import STOP_GRACE_SECONDS, Child, GeneratorPool, launch, stop_all
from .logs import add_file_log, last_error, remove_log
from .manifest import EXIT_BAD_INPUT, dump_manifest
from .messages import LearnerProgress
from .devicereport import read_reports
from .models import resolve_model
from .natsserver import EmbeddedNats, free_port
from .placement import Placement, describe, learner_processes, machine_gpus, plan
from .report import plot_rewards, read_evals, read_metrics, summarize, write_json
from .telemetry import LocalPorts
from .workload_env import WorkloadEnv, searcher_env

log = logging.getLogger("asyncrlhf.run")


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    ok: bool


def cpu_plan(cores: list[int], generators: int) -> tuple[list[int], list[list[int]]]:
    """Learner gets the first core, generators share the rest (as separate GPUs would be)."""
    if len(cores) < 2:
        return cores, [cores] * generators
    learner, rest = cores[:1], cores[1:]
    return learner, [[rest[i % len(rest)]] for i in range(generators)]


@dataclass
class LocalRun:
    job: AsyncRLHFJob
    run_dir: Path
    quiet: bool = False
    resume: bool = False  # continue the run in run_dir from its checkpoint, instead of starting over
    learners: list[Child] = field(default_factory=list)  # every learner process started (generators: self.generators)
    restarts: int = 0
    peak_memory: int = 0
    gpus: Optional[int] = None  # plan as if the machine had this many GPUs (--gpus); None = count them

    def __post_init__(self) -> None:
        self.spec = self.job.spec
        self.bus = JobBus(self.job.metadata.namespace, self.job.metadata.name)
        self.volume = self.run_dir / "volume"
        self.config = self.run_dir / "job.yaml"
        self.nats: Optional[EmbeddedNats] = None
        self.previous: Optional[Path] = None  # where an earlier run of the job was moved
        self.url = self.spec.nats.url
        # every process's GPUs (disjoint) and CUDA_VISIBLE_DEVICES; refused (PlacementError) before
        # anything starts when the machine has too few
        gpus = machine_gpus(os.environ, count_gpus()) if self.gpus is None else [str(i) for i in range(self.gpus)]
        self.placement: Placement = plan(self.spec, gpus)
        slots = generator_slots(self.spec, gpus)  # with autoscale: room for more generators than replicas
        cores = sorted(os.sched_getaffinity(0))
        self.learner_cores, self.generator_cores = cpu_plan(cores, max(1, len(slots)))
        self.console = Console(self.quiet)  # start-up phases, live progress (console.py)
        self.failure: Optional[Failure] = None  # why the run failed: the summary and the last line say it
        self.metrics_ports = LocalPorts(self.spec.metrics.port)  # each process's /metrics (telemetry.py)
        self.generators = GeneratorPool(self.config, self.run_dir, self._env, self.generator_cores, slots,
                                        self.metrics_ports, on_restart=self._generator_restarted,
                                        env_for=lambda i: searcher_env(self.spec.generator, i))  # TBA groups
        # most generators at once: on GPUs, as many as have GPUs of their own
        self.generator_limit = len(slots) if self.spec.generator.resources.gpus else max(
            self.spec.generator.autoscale.max_replicas, self.spec.generator.replicas)
        self.autoscaler: Optional[LocalAutoscaler] = None  # spec.generator.autoscale: made when the children start

    @property
    def children(self) -> list[Child]:
        """Every process started, generators first."""
        return self.generators.children + self.learners

    # --- processes -----------------------------------------------------------------------

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        contract = WorkloadEnv(nats_url=self.url, snapshot_dir=str(self.volume), run_dir=str(self.run_dir))
        return dict(os.environ) | contract.variables() | {"PYTHONUNBUFFERED": "1"} | extra

    def spawn(self, role: str, index: int, attempt: int = 0, env: Optional[dict[str, str]] = None) -> Child:
        """Start a learner rank, or a generator (local_generators.GeneratorPool: its index, cores and devices)."""
        if role == "generator":
            return self.generators.start(index, attempt)
        cores = self.learner_cores
        extra = {"OMP_NUM_THREADS": str(len(cores))} | (env or {}) | self.metrics_ports.env(role, index)
        child = launch(role, index, attempt, self.config, self.run_dir, self._env(extra), cores)
        self.learners.append(child)
        return child

    def spawn_learners(self, attempt: int = 0) -> None:
        """The learner: one process, or a group of ranks that rendezvous on a fresh local port."""
        n = learner_processes(self.spec)
        port = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())} if n > 1 else {}
        for rank in range(n):  # RANK, LOCAL_RANK, ..., CUDA_VISIBLE_DEVICES: placement.py
            self.spawn("learner", rank, attempt, self.placement.of("learner", rank).env | port)

    def learner_group(self) -> list[Child]:
        """The processes of the current learner attempt, rank 0 first."""
        attempt = max(c.attempt for c in self.learners)
        return sorted((c for c in self.learners if c.attempt == attempt), key=lambda c: c.index)

    def learner(self) -> Child:
        """Rank 0 of the current learner: the process that talks to the bus."""
        return self.learner_group()[0]

    def _sample_memory(self) -> None:
        total = 0
        me = psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak_memory = max(self.peak_memory, total)

    # --- lifecycle -----------------------------------------------------------------------

    def prepare(self) -> None:
        checkpoints = CheckpointStore(self.volume)
        if self.resume:
            if not checkpoints.exists():
                raise ResumeError(f"nothing to resume in {self.run_dir}: no checkpoint in {checkpoints.base} "
                                  "(run without --resume to start the job)")
        elif self.run_dir.exists():  # an earlier run of this job is kept, never deleted
            base = f"{self.run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            kept = self.run_dir.with_name(base)
            for suffix in itertools.count(1):  # two runs within a second
                if not kept.exists():
                    break
                kept = self.run_dir.with_name(f"{base}~{suffix}")
            self.run_dir.rename(kept)
            self.previous = kept
        self.volume.mkdir(parents=True, exist_ok=True)
        self.config.write_text(dump_manifest(self.job))
        with self.console.phase(f"model {self.spec.model.policy}", f"model {self.spec.model.policy} ready"):
            resolve_model(self.spec.model.policy)  # build the built-in model once, before the children
        if not self.url:
            with self.console.phase("starting nats-server", "nats-server started"):
                # the largest message the job's rollout groups may need (nats.maxMessageBytes)
                self.nats = EmbeddedNats(config=f"max_payload: {self.spec.nats.max_message_bytes}\n").start()
            self.url = self.nats.url

    async def run(self) -> RunResult:
        started = time.monotonic()
        # SIGTERM stops a run as Ctrl-C does: the run is cancelled and every child is stopped
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm, asyncio.current_task())
        self.prepare()
        file_log = add_file_log(self.run_dir / "run.log")  # this process's log (the console shows less)
        nc = await connect(self.url, name="asyncrlhf-run")
        js = nc.jetstream()
        try:
            await ensure_job_resources(js, self.bus, self.spec.nats.max_bytes, self.spec.nats.ack_wait_seconds)
            kv = await JobKV.open(js, self.bus.bucket)
            self.generators.scale_to(self.spec.generator.replicas)
            self.spawn_learners()
            if self.spec.generator.autoscale.enabled:  # its clock starts with the children
                self.autoscaler = LocalAutoscaler(self.spec, self.generators, self.run_dir, self.generator_limit)
            if self.metrics_ports.ports:
                self.console.line(self.metrics_ports.describe())
            ok = await self.supervise(kv, js)
            produced = sum(s.rollouts for s in (await kv.reports()).values())
            info = await js.stream_info(self.bus.stream, subjects_filter=self.bus.subject(WEIGHTS))
            snapshots = (info.state.subjects or {}).get(self.bus.subject(WEIGHTS), 0)
        finally:
            self.stop_children()
            await close_quietly(nc)
            if self.nats:
                bus_started = time.monotonic()
                self.nats.close()
                log.info("nats-server stopped in %.1f s", time.monotonic() - bus_started)
            self.console.close()
            remove_log(file_log)
        summary = summarize(self.job, self.run_dir, time.monotonic() - started, produced, snapshots,
                            self.peak_memory, self.restarts)
        summary["ok"] = ok
        if self.autoscaler is not None:
            summary["autoscale"] = self.autoscaler.summary()
        if self.failure is not None:
            summary["failure"] = self.failure.as_dict()
        if devices := read_reports(self.run_dir):  # GPU processes: CUDA memory each allocated (devicereport.py)
            summary["cuda_max_memory_allocated"] = devices
        write_json(self.run_dir / "summary.json", summary)
        label = f"{self.spec.async_.mode} (N={self.spec.async_.effective_staleness})"
        plot_rewards({label: read_metrics(self.run_dir)}, self.run_dir / "reward.png",
                     f"{self.job.metadata.name}: reward vs wall-clock", evals={label: read_evals(self.run_dir)})
        return RunResult(self.run_dir, summary, ok)

    async def supervise(self, kv: JobKV, js) -> bool:
        """Show start-up and progress, restart what dies; True when the learner finished all steps."""
        progress, watch = None, StartupWatch(self.spec.generator.replicas, self.spec.generator.engine)
        while True:
            await asyncio.sleep(1.0)
            self._sample_memory()
            progress = await kv.progress() or progress  # the bus away: the last known
            await self._show(watch, progress, kv, js)
            await self._autoscale(kv, progress)
            group = self.learner_group()
            codes = [c.proc.poll() for c in group]
            if codes[0] == 0 and progress and progress.done:
                return True
            failed = [(c.index, code) for c, code in zip(group, codes) if code not in (None, 0)]
            if failed or codes[0] is not None:
                rank, code = failed[0] if failed else (0, codes[0])
                name = "learner" if len(group) == 1 else f"learner rank {rank}"
                if code == EXIT_BAD_INPUT:  # a restart cannot fix a manifest or environment error
                    return self._fail(name, f"learner-{rank}", code, progress)
                if self.restarts >= self.spec.learner.backoff_limit:
                    return self._fail(name, f"learner-{rank}", code, progress, f" (after {self.restarts} restarts; "
                                      f"learner.backoffLimit is {self.spec.learner.backoff_limit})")
                self.restarts += 1
                self.console.note(f"{name} exited with {code}; restarting the learner from its checkpoint "
                                  f"({self.restarts}/{self.spec.learner.backoff_limit})")
                self._kill(group)
                self.spawn_learners(group[0].attempt + 1)
            if not self._restart_dead_generators(progress):
                return False

    async def _show(self, watch: StartupWatch, progress: Optional[LearnerProgress], kv: JobKV, js) -> None:
        """Start-up milestones seen on the bus until all are reached, then the training progress."""
        if not watch.complete:
            try:
                seen = await self._observe(kv, js, progress)
            except Exception:  # noqa: BLE001 -- the bus away for a moment: the display waits
                seen = Observed(stepped=progress is not None)
            for line in watch.update(seen):
                self.console.line(line)
        if progress is not None:
            self.console.progress(progress)
        elif not watch.complete:
            self.console.waiting(watch.current(), time.monotonic() - watch.started)

    async def _autoscale(self, kv: JobKV, progress: Optional[LearnerProgress]) -> None:
        """spec.generator.autoscale: every intervalSeconds, the policy's decision applied (local_autoscale.py)."""
        if self.autoscaler is None or not self.autoscaler.due(time.time()):
            return
        try:
            reports = await kv.reports()
        except BUS_ERRORS:  # the bus away for a moment: this interval is skipped
            return
        record = self.autoscaler.step(progress, reports)
        if record is not None:
            self.console.line(scale_line(record))

    async def _observe(self, kv: JobKV, js, progress: Optional[LearnerProgress]) -> Observed:
        info = await js.stream_info(self.bus.stream, subjects_filter=self.bus.subject(WEIGHTS))
        ids = [r.generator_id.split("-") for r in (await kv.reports()).values()]  # gen-<index>-<attempt>
        reporting = {int(i[1]) for i in ids if len(i) == 3 and i[0] == "gen" and i[1].isdigit()}
        return Observed(learner_ready=info.state.last_seq > 0, generators=frozenset(reporting),
                        stepped=progress is not None,
                        snapshots=(info.state.subjects or {}).get(self.bus.subject(WEIGHTS), 0))

    def _fail(self, process: str, log_name: str, code: Optional[int], progress: Optional[LearnerProgress],
              more: str = "") -> bool:
        """Record why the run failed (the last error in the process's log, not a traceback)."""
        log = self.run_dir / f"{log_name}.log"
        died = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with {code}"
        reason = (last_error(log) or f"{died}, no error in its log") + more
        self.failure = Failure(process, progress.step if progress else 0, reason, str(log), code)
        return False

    @staticmethod
    def _kill(children: list[Child]) -> None:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
            c.proc.wait()

    def _restart_dead_generators(self, progress: Optional[LearnerProgress] = None) -> bool:
        """Restart generators that died; False when one refused its input (a restart cannot help)."""
        refused = self.generators.check()
        if refused is not None:
            code = refused.proc.returncode
            return self._fail(f"generator {refused.index}", refused.name, code, progress)
        return True

    def _generator_restarted(self, index: int, code: int) -> None:
        self.console.note(f"generator {index} exited with {code}; starting a new one")

    @staticmethod
    def _on_sigterm(task: asyncio.Task) -> None:
        log.info("SIGTERM: stopping the run")
        task.cancel()

    def stop_children(self, timeout: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM each child's process group, SIGKILL what is left after `timeout`; how each ended
        goes to run.log (a child that had to be killed as a warning)."""
        stopped = stop_all(self.children, timeout)
        if stopped:
            log.info("children stopped: %s", ", ".join(map(str, stopped)))
        for s in stopped:
            if s.killed:
                log.warning("%s was still running %.0f s after SIGTERM: killed", s.name, timeout)


def count_gpus() -> int:
    """GPUs this machine offers to `asyncrlhf run` (those CUDA_VISIBLE_DEVICES leaves visible)."""
    import torch

    return torch.cuda.device_count()


def dry_run(job: AsyncRLHFJob, run_dir: Path, gpus: Optional[int] = None) -> list[str]:
    """`asyncrlhf run --dry-run`: what would start, on which devices, with which environment
    (secrets masked); starts nothing. Raises PlacementError as the real run would."""
    from .engines.vllm_engine import attention_heads
    from .placement import generator_layout

    run = LocalRun(job, run_dir, quiet=True, gpus=gpus)
    heads = None if job.spec.model.policy.startswith("builtin:") else attention_heads(job.spec.model.policy)
    if heads and generator_layout(job.spec).gpus:
        plan(job.spec, run.placement.machine_gpus, heads)  # raises when TP does not divide the heads
    envs = {}
    command = [sys.executable, "-m", "asyncrlhf.cli", "<role>", "--config", str(run.config)]
    for p in run.placement.processes:
        cores = run.learner_cores if p.role == "learner" else run.generator_cores[p.index % len(run.generator_cores)]
        runner = WorkloadEnv(nats_url=run.url or "<embedded nats-server>", snapshot_dir=str(run.volume),
                             run_dir=str(run.run_dir)).variables()
        envs[p.name] = runner | {"CPU_CORES": ",".join(map(str, cores))} | {
            k: v for k, v in os.environ.items() if k.startswith(("ASYNCRLHF_", "NATS_", "HF_"))} | (
            searcher_env(job.spec.generator, p.index) if p.role == "generator" else {})
    head = [f"dry run of {job.metadata.name}: nothing is started", "command: " + " ".join(command)]
    if heads is None and generator_layout(job.spec).tensor_parallel > 1:
        head.append(f"(tensor parallelism not checked: {job.spec.model.policy}'s config is not on this machine)")
    return head + describe(run.placement, envs)


class ResumeError(ValueError):
    """`--resume` with nothing to resume."""


def run_job(job: AsyncRLHFJob, run_dir: Path, quiet: bool = False, resume: bool = False,
            gpus: Optional[int] = None) -> RunResult:
    run = LocalRun(job, run_dir, quiet, resume=resume, gpus=gpus)
    result = asyncio.run(run.run())
    if run.previous is not None and not quiet:
        print(f"(the earlier run of this job was moved to {run.previous})", file=sys.stderr)
    return result


def compare(job: AsyncRLHFJob, runs_root: Path, quiet: bool = False) -> dict:
    """Run the job in sync and in async mode, one after the other, and report side by side."""
    name = job.metadata.name
    results = {}
    for mode in ("sync", "async"):
        variant = job.model_copy(deep=True)
        variant.spec.async_.mode = mode
        variant.metadata.name = f"{name}-{mode}"
        if not quiet:
            print(f"=== {mode} run ===", flush=True)
        results[mode] = run_job(variant, runs_root / variant.metadata.name, quiet)
    out = runs_root / f"{name}-compare"
    out.mkdir(parents=True, exist_ok=True)
    s, a = results["sync"].summary, results["async"].summary
    summary = {
        "sync": s, "async": a,
        "speedup_training_wall_clock": s["training_seconds"] / a["training_seconds"] if a["training_seconds"] else None,
        "speedup_total_wall_clock": s["wall_clock_seconds"] / a["wall_clock_seconds"] if a["wall_clock_seconds"] else None,
        "final_reward": {"sync": s["final_reward_mean"], "async": a["final_reward_mean"]},
    }
    write_json(out / "summary.json", summary)
    plot_rewards({"sync": read_metrics(results["sync"].run_dir),
                  f"async (N={job.spec.async_.max_staleness})": read_metrics(results["async"].run_dir)},
                 out / "reward.png", f"{name}: sync vs async")
    return summary
