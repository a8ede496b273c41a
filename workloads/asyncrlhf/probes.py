"""A generator's pod probes: /readyz and /livez, on their own small HTTP server.

Ready: the engine is loaded (the server starts only once it is), the process is connected to the
bus and it has tried the newest announced snapshot (or found none: the initial weights). A
generator that is not ready still works; readiness only feeds the job's "ready generators".

Live: the main loop is making progress, or doing bounded work. The loop passes `progress()` at
least every second while it waits for prompts or weights, so waiting (however long) is live;
generating, loading weights and publishing run inside `working()`, live until the generation's
hold limit (the longest it may keep prompts, generator.py). Dead: the loop has not moved for
`stall_limit` (a wedged event loop: its keep-alives have stopped too, so its prompts are being
redelivered anyway), or one piece of work ran past its limit (a hung engine). A SIGSTOP'd or
frozen process answers nothing, which the kubelet counts as a failure too.

Why a port of its own (`ASYNCRLHF_PROBES_ADDRESS`, set by the operator's pods) and not the
metrics port: metrics can be off (`spec.metrics.port: 0`) and probes cannot. Only the kubelet
calls it (probes come from the node, which NetworkPolicies always allow), and it tells nothing
but "ok" or why not. Unset (`asyncrlhf run`), no server runs.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Mapping, Optional

from .workload_env import PROBES_ADDRESS

log = logging.getLogger("asyncrlhf.probes")
STALL_MIN_SECONDS = 10.0  # the loop may pause this long (a GC, a busy GIL) before it counts as wedged


class Probes:
    """What /readyz and /livez answer, from what the generator tells it."""

    def __init__(self, stall_limit: float, work_limit: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_limit, self.work_limit, self.clock = stall_limit, work_limit, clock
        self.last_progress = clock()
        self.working_since: Optional[float] = None
        self.work = ""
        self.weights_checked = False  # the newest announced snapshot tried (or none announced)
        self.connected: Callable[[], bool] = lambda: False
        self.stopping: Callable[[], bool] = lambda: False

    def progress(self) -> None:
        self.last_progress = self.clock()

    @contextmanager
    def working(self, what: str) -> Iterator[None]:
        """Bounded work (generating, loading weights): live until `work_limit`."""
        self.working_since, self.work = self.clock(), what
        try:
            yield
        finally:
            self.working_since, self.work = None, ""
            self.progress()

    def live(self) -> tuple[bool, str]:
        now = self.clock()
        if self.working_since is not None:
            took = now - self.working_since
            if took > self.work_limit:
                return False, f"{self.work} for {took:.0f} s, longer than its {self.work_limit:.0f} s limit"
            return True, f"ok ({self.work} for {took:.0f} s)"
        idle = now - self.last_progress
        if idle > self.stall_limit:
            return False, f"the main loop has not moved for {idle:.0f} s (limit {self.stall_limit:.0f} s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.stopping():
            return False, "stopping"
        if not self.connected():
            return False, "not connected to the bus"
        if not self.weights_checked:
            return False, "the newest weights are not loaded yet"
        return True, "ok"


class _Handler(BaseHTTPRequestHandler):
    probes: Probes

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        checks = {"/livez": self.probes.live, "/readyz": self.probes.ready}
        check = checks.get(self.path.split("?")[0])
        ok, text = check() if check else (False, "not found: /readyz or /livez")
        body = (text + "\n").encode()
        self.send_response(200 if ok else 404 if check is None else 503)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # a probe every few seconds is not worth a log line
        pass


class ProbeServer:
    """/readyz and /livez in a daemon thread (it answers while the event loop is busy or wedged)."""

    def __init__(self, probes: Probes, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"probes": probes})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="probes", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_probes(probes: Probes, env: Mapping[str, str]) -> Optional[ProbeServer]:
    """The probe server on $ASYNCRLHF_PROBES_ADDRESS (host:port), or None when it is unset or the
    port cannot be bound (logged: the probes then fail, and the pod's events say why)."""
    address = env.get(PROBES_ADDRESS, "")
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        server = ProbeServer(probes, host or "0.0.0.0", int(port))
    except (OSError, ValueError) as err:
        log.error("no probes: cannot serve /readyz and /livez on %s=%r: %s", PROBES_ADDRESS, address, err)
        return None
    log.info("probes at http://%s:%d/readyz and /livez", host or "0.0.0.0", server.port)
    return server
