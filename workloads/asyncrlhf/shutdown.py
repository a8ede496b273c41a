"""Stopping a workload process when told: gracefully if it can, within a bound whatever it is doing.

SIGTERM or SIGINT sets the process's `stopping` event: the learner stops between steps, a
generator hands back its prompts. Some states cannot notice the event soon — a training step or
a generation running in a thread, a request to a bus that is gone — so the first signal
also starts a watchdog that ends the process after GRACE_SECONDS, and a second signal ends it at
once. Ending a workload abruptly is safe by design: what a learner has not checkpointed and what
a generator has not published is redelivered. A pod's grace period (30 s by default) and
`asyncrlhf run`'s are longer than GRACE_SECONDS, so they never have to SIGKILL. With the bus away,
waiting is pointless (nothing can be handed back, each request waits out its timeout):
`unless_stranded` cuts the work short at once, and the process exits by itself (once an engine
or training call in flight in a thread returns: the watchdog still bounds that).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any, Awaitable, Callable

log = logging.getLogger("asyncrlhf.shutdown")
GRACE_SECONDS = 8.0
# The exit code of a learner stopped before its last step (as if SIGTERM had killed it): to a
# Kubernetes Job an exit 0 is a completion, and a learner evicted mid-run has not completed
# (the Job's podFailurePolicy ignores disruptions; the operator recreates a learner that failed).
EXIT_STOPPED = 128 + signal.SIGTERM
STRANDED_CHECK_SECONDS = 0.5  # how often `unless_stranded` looks for "stopping, and the bus away"


def install(stopping: asyncio.Event, grace: float = GRACE_SECONDS) -> None:
    """Handle SIGTERM/SIGINT in the running event loop (see the module docstring)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: stopping (at most %.0f s)", signal.Signals(signum).name, grace)
        stopping.set()
        timer = threading.Timer(grace, _exit_late, args=(signum, grace))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def _exit_late(signum: int, grace: float) -> None:
    log.warning("still running %.0f s after %s: exiting (unfinished work is redelivered)", grace,
                signal.Signals(signum).name)
    logging.shutdown()
    os._exit(128 + signum)


class Stranded(Exception):
    """Work cut short by `unless_stranded`: stopping, with the bus away."""


async def unless_stranded(work: Awaitable[Any], stopping: asyncio.Event, connected: Callable[[], bool]) -> Any:
    """`work`'s result; once `stopping` is set while `connected()` is False, the work is cancelled
    and Stranded raised (what it held on the bus is redelivered; a thread it started runs on, and
    the watchdog bounds that)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        try:
            await asyncio.wait({task}, timeout=STRANDED_CHECK_SECONDS)
        except asyncio.CancelledError:  # the caller is cancelled: so is its work
            task.cancel()
            raise
        if stopping.is_set() and not connected() and not task.done():
            task.cancel()
            log.info("stopping with the bus away: what this process held is redelivered")
            await asyncio.wait({task}, timeout=STRANDED_CHECK_SECONDS)  # its cleanup runs before the caller's
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.info("the work cut short ended with: %r", task.exception())  # retrieved: not logged as lost
            raise Stranded()
    return task.result()
