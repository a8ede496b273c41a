"""Fault injection at named points of the learner, for the fault suite (tests/test_faults.py).

    ASYNCRLHF_FAULT=<point>:<n>:<action>   at the n-th pass through <point>, do <action>
    ASYNCRLHF_FAULT_ONCE=<path>           fire once per run: the file is created when the fault
                                          fires, and no fault fires while it exists (the restarted
                                          process must get past the point)

Points: snapshot-write (the snapshot written, not yet renamed into place), checkpoint-write (the
same for a checkpoint), after-train (the optimizer stepped, nothing recorded or acked), announce
(before a weights announcement), prune (before old snapshots are deleted). Actions: kill (SIGKILL
the process), enospc / eio (raise that OSError). Unset, every point is a no-op dictionary lookup.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections import Counter

log = logging.getLogger("asyncrlhf.faults")
POINTS = ("snapshot-write", "checkpoint-write", "after-train", "announce", "prune")
ACTIONS = ("kill", "enospc", "eio")
FAULT, FAULT_ONCE = "ASYNCRLHF_FAULT", "ASYNCRLHF_FAULT_ONCE"
_passes: Counter = Counter()


def parse(value: str) -> tuple[str, int, str]:
    try:
        point, n, action = value.split(":")
        count = int(n)
    except ValueError:
        raise ValueError(f"{FAULT}={value!r}: expected <point>:<n>:<action>, e.g. checkpoint-write:2:kill") from None
    if point not in POINTS or action not in ACTIONS or count < 1:
        raise ValueError(f"{FAULT}={value!r}: points are {', '.join(POINTS)}; actions {', '.join(ACTIONS)}; n >= 1")
    return point, count, action


def fault_point(name: str) -> None:
    value = os.environ.get(FAULT)
    if not value:
        return
    point, n, action = parse(value)
    if point != name:
        return
    _passes[name] += 1
    once = os.environ.get(FAULT_ONCE)
    if _passes[name] != n or (once and os.path.exists(once)):
        return
    if once:
        open(once, "w").close()
    log.warning("fault injection: %s at %s (pass %d)", action, name, n)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (injected at {name})")
