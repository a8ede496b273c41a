"""`asyncrlhf run`'s child processes, and its generators as a set that can grow and shrink while the
job runs (the autoscaler's decisions: local.py).

A child is `python -m asyncrlhf.cli <role>` with the job's environment, its own CPU cores, a log
file `<role>-<index>.log` in the run directory, in a process group of its own (an engine's
subprocesses are stopped with it) and killed with the runner even when the runner is SIGKILLed.

Generators are stateless, so the set is just processes pointed at the same bus:
  * index i is never reused within a run: a generator added after one was removed gets a fresh
    index, so its id (`gen-<i>-<attempt>`), its KV report, its log and its /metrics port are its own;
  * a generator that dies is started again under the same index, attempt + 1 (its restarts count
    per process), in the same slot; one that refuses its input (exit 2) is not — a restart cannot fix that;
  * a slot is a share of the machine (CPU cores, and GPUs when generators have some: `devices`); a new
    generator takes a slot no running generator holds, so two never share a GPU while there are
    enough slots (the runner allows no more generators than slots on GPUs: local.py);
  * scaling down stops the newest generators with SIGTERM: they hand their prompts back and exit
    (shutdown.py); one still running after STOP_GRACE_SECONDS is killed with its process group.
    A stopped generator is never restarted.
Per-process settings (a generator group's own configuration, say) come from `env_for(index)`,
added to the process's environment after everything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

from .manifest import EXIT_BAD_INPUT
from .telemetry import LocalPorts
from .workload_env import GENERATOR_ID

STOP_GRACE_SECONDS = 30.0  # longer than shutdown.GRACE_SECONDS: a stopped generator ends itself


@dataclass
class Child:
    role: str
    index: int
    proc: subprocess.Popen
    attempt: int = 0
    slot: int = 0  # a generator's placement slot: its cores and devices (kept across its restarts)
    stopped_at: Optional[float] = None  # when the runner told it to stop (scaled away): not restarted
    reaped: bool = False  # stopped, exited (or killed) and what was left of its group killed

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def launch(role: str, index: int, attempt: int, config: Path, run_dir: Path, env: dict[str, str],
           cores: list[int]) -> Child:
    """Start one workload process (its output appended to `<role>-<index>.log`)."""
    with open(run_dir / f"{role}-{index}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "asyncrlhf.cli", role, "--config", str(config)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: child_setup(cores),
            start_new_session=True,  # its own process group: engine subprocesses are stopped with it
        )
    return Child(role, index, proc, attempt)


def child_setup(cores: list[int]) -> None:
    """In a child, before exec: its CPU cores, and death with `asyncrlhf run` even when that is
    SIGKILLed (Linux: PR_SET_PDEATHSIG), so no generator or learner outlives the run."""
    os.sched_setaffinity(0, cores)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class Stopped:
    """How a child ended when the run stopped it: seconds after the SIGTERM (an upper bound: the
    children are waited for one after the other), and whether it had to be SIGKILLed."""

    name: str
    seconds: float
    killed: bool

    def __str__(self) -> str:
        return f"{self.name} killed after {self.seconds:.1f} s" if self.killed else f"{self.name} {self.seconds:.1f} s"


def stop_all(children: list[Child], timeout: float = 30.0) -> list[Stopped]:
    """SIGTERM each child's process group, SIGKILL what is left after `timeout`; how each running
    child ended (those already gone are not listed)."""
    running = [c for c in children if c.proc.poll() is None]
    for c in children:
        signal_group(c.proc, signal.SIGTERM)
    started = time.monotonic()
    deadline, out = started + timeout, []
    for c in children:
        killed = False
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed = True
        signal_group(c.proc, signal.SIGKILL)  # leftovers of the group (e.g. vLLM's engine core)
        c.proc.wait()
        if c in running:
            out.append(Stopped(c.name, time.monotonic() - started, killed))
    return out


@dataclass
class GeneratorPool:
    """The run's generator processes (see the module docstring)."""

    config: Path  # the manifest every generator reads
    run_dir: Path  # where the logs go
    environment: Callable[[dict[str, str]], dict[str, str]]  # the job's environment, with these extras
    cores: list[list[int]]  # CPU cores per slot (slots past the list reuse it round-robin)
    devices: list[dict[str, str]]  # each slot's device variables (CUDA_VISIBLE_DEVICES ...); [] on CPUs
    ports: LocalPorts  # each generator's /metrics port (kept across its restarts)
    env_for: Callable[[int], Mapping[str, str]] = lambda index: {}  # per-process settings (the hook)
    on_restart: Callable[[int, int], None] = lambda index, code: None  # (index, exit code): tell a person
    launcher: Callable[..., Child] = launch  # how a process starts (tests: something cheaper than a generator)
    children: list[Child] = field(default_factory=list)  # every process started, in order

    def start(self, index: int, attempt: int = 0, slot: Optional[int] = None) -> Child:
        slot = self.free_slot() if slot is None else slot
        cores = self.cores[slot % len(self.cores)]
        extra = {GENERATOR_ID: f"gen-{index}-{attempt}", "OMP_NUM_THREADS": str(len(cores)),
                 "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}
        if self.devices:
            extra |= self.devices[slot % len(self.devices)]
        extra |= self.ports.env("generator", index) | dict(self.env_for(index))
        child = self.launcher("generator", index, attempt, self.config, self.run_dir, self.environment(extra), cores)
        child.slot = slot
        self.children.append(child)
        return child

    def free_slot(self) -> int:
        """The first slot no generator holds (a stopped one holds its slot until it is gone)."""
        held = {c.slot for c in self.latest().values() if c.stopped_at is None or not c.reaped}
        return next(i for i in range(len(held) + 1) if i not in held)

    def latest(self) -> dict[int, Child]:
        """Each index's newest process."""
        latest: dict[int, Child] = {}
        for c in self.children:
            latest[c.index] = c
        return latest

    def members(self) -> list[Child]:
        """The generators the run wants (not stopped by a scale-down), oldest index first."""
        return sorted((c for c in self.latest().values() if c.stopped_at is None), key=lambda c: c.index)

    @property
    def size(self) -> int:
        return len(self.members())

    def running(self) -> int:
        """Members whose process is alive (one that died waits for its restart)."""
        return sum(1 for c in self.members() if c.proc.poll() is None)

    def stopping(self) -> int:
        """Generators told to stop and not gone yet."""
        return sum(1 for c in self.latest().values() if c.stopped_at is not None and not c.reaped)

    def ids(self) -> set[str]:
        """The bus ids of the generators the run wants now."""
        return {f"gen-{c.index}-{c.attempt}" for c in self.members()}

    def scale_to(self, n: int, now: Optional[float] = None) -> None:
        """Start fresh generators, or stop the newest ones, until `n` are wanted."""
        members = self.members()
        for _ in range(n - len(members)):
            self.start(max((c.index for c in self.children), default=-1) + 1)
        for child in reversed(members[n:] if n < len(members) else []):
            child.stopped_at = time.monotonic() if now is None else now
            signal_group(child.proc, signal.SIGTERM)

    def check(self, now: Optional[float] = None) -> Optional[Child]:
        """Restart members that died; reap stopped ones (killed after STOP_GRACE_SECONDS). Returns a
        member that refused its input (exit 2, not restarted: the run cannot go on), else None."""
        now = time.monotonic() if now is None else now
        for child in self.latest().values():
            code = child.proc.poll()
            if child.stopped_at is not None:
                if not child.reaped and (code is not None or now - child.stopped_at > STOP_GRACE_SECONDS):
                    signal_group(child.proc, signal.SIGKILL)  # the rest of its group, or itself when late
                    child.reaped = True
                continue
            if code == EXIT_BAD_INPUT:
                return child
            if code is not None and code != 0:
                self.on_restart(child.index, code)
                self.start(child.index, child.attempt + 1, child.slot)
        return None
