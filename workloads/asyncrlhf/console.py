"""What `asyncrlhf run` shows a person: start-up phases with their times, live training progress,
and how the run ended, in one line when it failed.

The first minute of a run is spent loading (the built-in model, nats-server, torch and the
learner's model, the generators' engines); each phase is shown while it runs and with its time
once done, so a slow start is visibly slow rather than silent. The supervisor learns about the
children's phases from the bus (`StartupWatch`: a learner that publishes is ready, a generator
that reports has its engine up), not from their logs. On a terminal the status line is rewritten
in place; in a pipe or a CI log each change is one plain line. `quiet` shows only the outcome.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional

from .messages import LearnerProgress

BAR_WIDTH = 20
SPINNER = "|/-\\"


@dataclass
class Observed:
    """What the supervisor saw on the bus at one moment."""

    learner_ready: bool = False  # the learner published (prompts, or a restored snapshot)
    generators: frozenset[int] = frozenset()  # generator indices that reported (engine up)
    stepped: bool = False  # the learner reported progress (a step trained)
    snapshots: int = 0  # weights announcements on the stream


@dataclass
class StartupWatch:
    """The children's start-up milestones: pending ones (with what they are doing) and, as they
    complete, lines saying what finished and how long it took since the children started."""

    generators: int
    engine: str
    started: float = field(default_factory=time.monotonic)
    done: set[str] = field(default_factory=set)

    def pending(self) -> dict[str, str]:
        steps = {"learner": "learner: loading torch, the model and the optimizer"}
        steps |= {f"generator-{i}": f"generator {i}: starting the {self.engine} engine" for i in range(self.generators)}
        steps |= {"step": "first batch: generating and training on it", "snapshot": "first snapshot"}
        return {k: v for k, v in steps.items() if k not in self.done}

    def current(self) -> dict[str, str]:
        """What is being waited for now: the processes' start, then the first step, then the first snapshot."""
        pending = self.pending()
        starting = {k: v for k, v in pending.items() if k not in ("step", "snapshot")}
        return starting or dict(list(pending.items())[:1])

    def update(self, seen: Observed, now: Optional[float] = None) -> list[str]:
        """Lines for the milestones `seen` completes, in a fixed order."""
        now = time.monotonic() if now is None else now
        reached = {"learner": seen.learner_ready or seen.stepped, "step": seen.stepped, "snapshot": seen.snapshots > 0}
        reached |= {f"generator-{i}": i in seen.generators for i in range(self.generators)}
        texts = {"learner": "learner ready", "step": "first step trained", "snapshot": "first snapshot published"}
        texts |= {f"generator-{i}": f"generator {i}: {self.engine} engine started" for i in range(self.generators)}
        lines = []
        for key in self.pending():
            if reached.get(key):
                self.done.add(key)
                lines.append(done_line(texts[key], now - self.started))
        return lines

    @property
    def complete(self) -> bool:
        return not self.pending()


def done_line(text: str, seconds: float) -> str:
    return f"  ok  {text:<44} {seconds:6.1f} s"


def eta(step: int, total: int, first: Optional[tuple[int, float]], now: float) -> Optional[float]:
    """Seconds left at the rate since `first` (step, time) was seen; None until a step passed."""
    if first is None or step <= first[0] or now <= first[1]:
        return None
    return (total - step) * (now - first[1]) / (step - first[0])


def clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def progress_line(p: LearnerProgress, eta_seconds: Optional[float] = None, bar: bool = False) -> str:
    done = p.step / p.total_steps if p.total_steps else 0.0
    filled = int(done * BAR_WIDTH)
    shown = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " if bar else ""
    reward = "-" if p.reward_mean is None else f"{p.reward_mean:.3f}"
    dropped = f"  dropped {p.rollouts_dropped}" if p.rollouts_dropped else ""
    return (f"step {p.step}/{p.total_steps} {shown}{done:4.0%}  ETA {clock(eta_seconds)}  reward {reward}  "
            f"staleness {p.staleness_mean:.2f} (max {p.staleness_max})  samples/s {p.samples_per_second:.1f}  "
            f"policy v{p.policy_version}{dropped}")


def scale_line(record: dict) -> str:
    """An autoscaler decision (local_autoscale.py): "generators 2 → 3: the learner waited 40% of the last 60 s ..."."""
    reason, span = record["reason"], record.get("interval_seconds")
    if span:
        reason = reason.replace("of the interval", f"of the last {span:.0f} s")
    return f"generators {record['from']} → {record['to']}: {reason}"


class Console:
    """The run's console: permanent lines, and one status line (in place on a terminal)."""

    def __init__(self, quiet: bool = False, out: Optional[IO[str]] = None) -> None:
        self.quiet, self.out = quiet, out or sys.stdout
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self._status = ""
        self._ticks = 0
        self._first: Optional[tuple[int, float]] = None  # (step, time) of the first progress seen

    def line(self, text: str) -> None:
        """A permanent line above the status line."""
        if self.quiet:
            return
        self._clear()
        print(text, file=self.out, flush=True)
        self._redraw()

    def note(self, text: str) -> None:
        """Something a person must see even with `quiet` (a restart): on stderr."""
        self._clear()
        print(text, file=sys.stderr, flush=True)
        self._redraw()

    def status(self, text: str) -> None:
        """The changing line: rewritten in place on a terminal, else printed when it changes."""
        if self.quiet:
            return
        if self.live:
            self._status = text
            self._redraw()
        elif text != self._status:
            self._status = text
            print(text, file=self.out, flush=True)

    def waiting(self, pending: dict[str, str], seconds: float) -> None:
        """What the run is waiting for, and for how long (on a terminal, a spinner shows it is alive)."""
        self._ticks += 1
        spin = SPINNER[self._ticks % len(SPINNER)] + " " if self.live else ""
        if self.live:
            self.status(f"  {spin}{'; '.join(pending.values())}  {seconds:.0f} s")
        else:  # one line per change of what is pending, not one per second
            self.status(f"  ... {'; '.join(pending.values())}")

    def progress(self, p: LearnerProgress, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        if self._first is None or p.step < self._first[0]:
            self._first = (p.step, now)
        self.status(progress_line(p, eta(p.step, p.total_steps, self._first, now), bar=self.live))

    @contextlib.contextmanager
    def phase(self, doing: str, done: str) -> Iterator[None]:
        """A phase the supervisor runs itself (building the model, starting nats-server)."""
        started = time.monotonic()
        self.status(f"  ... {doing}")
        yield
        self.line(done_line(done, time.monotonic() - started))

    def close(self) -> None:
        """End the status line (it stays on screen as the last progress shown)."""
        if self.live and self._status and not self.quiet:
            print(file=self.out, flush=True)
        self._status = ""

    def _clear(self) -> None:
        if self.live and self._status:
            self.out.write("\r\x1b[2K")

    def _redraw(self) -> None:
        if self.live and self._status:
            self.out.write("\r\x1b[2K" + self._status[: shutil.get_terminal_size().columns - 1])
            self.out.flush()


# ---------------------------------------------------------------------------------------------
# The end of a run


@dataclass
class Failure:
    """Why a run failed: the process, the step it had reached, the reason and the full log."""

    process: str
    step: int
    reason: str
    log: str
    exit_code: Optional[int] = None

    def line(self) -> str:
        code = f", exit {self.exit_code}" if self.exit_code is not None else ""
        return f"FAILED: {self.process} at step {self.step}{code}: {self.reason} (full log: {self.log})"

    def as_dict(self) -> dict:
        return {"process": self.process, "step": self.step, "exit_code": self.exit_code, "reason": self.reason,
                "log": self.log, "line": self.line()}


def outcome_lines(summary: dict, run_dir: Path) -> list[str]:
    """The few lines that end `asyncrlhf run`: how it went and where everything is."""
    report = f"report: {run_dir}/ (summary.json, metrics.jsonl, reward.png; each process's log: <role>-<i>.log)"
    if not summary.get("ok"):
        failure = summary.get("failure")
        return [failure["line"] if failure else "FAILED (the processes' logs say why)", report]

    def num(key: str, fmt: str = ".3f") -> str:
        value = summary.get(key)
        return "-" if value is None else format(value, fmt)

    return [
        f"done: {summary['steps']}/{summary['total_steps']} steps in {summary['wall_clock_seconds']:.0f} s "
        f"(training {summary['training_seconds']:.1f} s); reward {num('initial_reward_mean')} -> "
        f"{num('final_reward_mean')}; staleness mean {num('staleness_mean', '.2f')} max {summary['staleness_max']}",
        report,
        f"model: {run_dir}/volume/snapshots/v{summary['steps']}/ (asyncrlhf export {run_dir} OUT_DIR)",
    ]
