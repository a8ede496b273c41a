"""Fault injection at named points of the learner and the generator, for the fault suite
(tests/test_faults.py) and the probe tests (tests/test_probes.py).

    ASYNCRLHF_FAULT=<point>:<n>:<action>[,...]   at the n-th pass through <point>, do <action>
    ASYNCRLHF_FAULT_ONCE=<path>                 fire once per run: the file is created (atomically,
                                                so of several processes only one fires) when a
                                                fault fires, and no fault fires while it exists (a
                                                restarted process must get past the point); it
                                                holds the point's note (e.g. the prompts held)

Learner points: snapshot-write (the snapshot written, not yet renamed into place), checkpoint-write
(the same for a checkpoint), after-train (the optimizer stepped, nothing recorded or acked),
announce (before a weights announcement), prune (before old snapshots are deleted). Generator
points: reload (a snapshot about to be verified and loaded, in the loading thread), generate (the
engine answered, nothing published: the prompts are held), generator-loop (each pass of the main
loop, in the event loop's thread).

Actions: kill (SIGKILL the process), enospc / eio (raise that OSError), stop (SIGSTOP the process:
wedged until someone sends SIGCONT), hang (block the calling thread for an hour: a stuck engine
in a worker thread, a wedged event loop on the loop's thread), pause (block it for 5 s: a slow
load). Unset, every point is a no-op
dictionary lookup.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections import Counter

log = logging.getLogger("asyncrlhf.faults")
POINTS = ("snapshot-write", "checkpoint-write", "after-train", "announce", "prune",
          "reload", "generate", "generator-loop")
ACTIONS = ("kill", "enospc", "eio", "stop", "hang", "pause")
FAULT, FAULT_ONCE = "ASYNCRLHF_FAULT", "ASYNCRLHF_FAULT_ONCE"
HANG_SECONDS, PAUSE_SECONDS = 3600.0, 5.0
_passes: Counter = Counter()


def parse(value: str) -> tuple[str, int, str]:
    """One fault, `<point>:<n>:<action>`."""
    try:
        point, n, action = value.split(":")
        count = int(n)
    except ValueError:
        raise ValueError(f"{FAULT}={value!r}: expected <point>:<n>:<action>, e.g. checkpoint-write:2:kill") from None
    if point not in POINTS or action not in ACTIONS or count < 1:
        raise ValueError(f"{FAULT}={value!r}: points are {', '.join(POINTS)}; actions {', '.join(ACTIONS)}; n >= 1")
    return point, count, action


def parse_all(value: str) -> list[tuple[str, int, str]]:
    """Faults separated by commas."""
    return [parse(part.strip()) for part in value.split(",") if part.strip()]


def fault_point(name: str, note: str = "") -> None:
    value = os.environ.get(FAULT)
    if not value:
        return
    faults = [(n, action) for point, n, action in parse_all(value) if point == name]
    if not faults:
        return
    _passes[name] += 1
    for n, action in faults:
        if _passes[name] == n and _claim(note):
            _fire(name, n, action)


def _claim(note: str) -> bool:
    """True when this process may fire: no once-file, or this process created it."""
    once = os.environ.get(FAULT_ONCE)
    if not once:
        return True
    try:
        fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(note)
    return True


def _fire(name: str, n: int, action: str) -> None:
    log.warning("fault injection: %s at %s (pass %d)", action, name, n)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action in ("hang", "pause"):
        time.sleep(HANG_SECONDS if action == "hang" else PAUSE_SECONDS)
    else:
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, f"{os.strerror(code)} (injected at {name})")
