"""A generator's pod probes (asyncrlhf/probes.py) and the probes the operator gives its pods.

The rules with a hand-driven clock; the server's answers; the plan's probe specs; and one real
generator process whose /readyz and /livez flip as they should: not ready while it loads the
announced weights (slowed by a fault hook), ready after, and not live once its event loop is
wedged (another fault hook), while a loop that merely waits for prompts stays live.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from asyncrlhf import api, workload_env
from asyncrlhf.bus import WEIGHTS, EmbeddedNats, JobBus, connect, ensure_job_resources, free_port, publish
from asyncrlhf.manifest import dump_manifest
from asyncrlhf.messages import WeightsAnnouncement
from asyncrlhf.probes import Probes, ProbeServer, serve_probes
from asyncrlhf_operator import plan
from asyncrlhf_operator.plan import pods


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def probes(clock: Clock) -> Probes:
    p = Probes(stall_limit=10.0, work_limit=1800.0, clock=clock)
    p.connected = lambda: True
    p.weights_checked = True
    return p


# --- liveness: (seconds since the last progress, seconds working or None) -> live?
LIVE = [
    ("just moved", 0.0, None, True),
    ("waiting for prompts, a pass each second", 1.0, None, True),
    ("at the stall limit", 10.0, None, True),
    ("wedged loop", 10.5, None, False),
    ("generating for 20 minutes", 0.0, 1200.0, True),
    ("generating at the hold limit", 0.0, 1800.0, True),
    ("engine hung past the hold limit", 0.0, 1801.0, False),
]


@pytest.mark.parametrize("case,idle,working,live", LIVE, ids=[c[0] for c in LIVE])
def test_liveness(case, idle, working, live):
    clock = Clock()
    p = probes(clock)
    if working is not None:
        with p.working("answering prompts"):
            clock.now += working
            assert p.live()[0] is live, p.live()
        assert p.live()[0], "work that ends is progress"
    else:
        clock.now += idle
        assert p.live()[0] is live, p.live()


def test_the_reasons_name_what_is_wrong():
    clock = Clock()
    p = probes(clock)
    with p.working("loading weights"):
        clock.now += 2000
        assert p.live() == (False, "loading weights for 2000 s, longer than its 1800 s limit")
    clock.now += 11
    assert p.live() == (False, "the main loop has not moved for 11 s (limit 10 s)")


READY = [
    ("ready", True, True, False, (True, "ok")),
    ("no bus", False, True, False, (False, "not connected to the bus")),
    ("weights not tried yet", True, False, False, (False, "the newest weights are not loaded yet")),
    ("stopping", True, True, True, (False, "stopping")),
]


@pytest.mark.parametrize("case,connected,weights,stopping,expected", READY, ids=[c[0] for c in READY])
def test_readiness(case, connected, weights, stopping, expected):
    p = probes(Clock())
    p.connected, p.weights_checked, p.stopping = (lambda: connected), weights, (lambda: stopping)
    assert p.ready() == expected


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode().strip()


def test_the_server_answers_200_503_and_404():
    clock = Clock()
    p = probes(clock)
    server = ProbeServer(p, "127.0.0.1", 0)
    try:
        assert get(server.port, "/livez") == (200, "ok") and get(server.port, "/readyz") == (200, "ok")
        clock.now += 60
        p.weights_checked = False
        assert get(server.port, "/livez")[0] == 503 and get(server.port, "/readyz")[0] == 503
        assert get(server.port, "/metrics")[0] == 404
    finally:
        server.close()


def test_the_server_runs_only_where_the_pod_asks_for_it():
    p = probes(Clock())
    assert serve_probes(p, {}) is None  # asyncrlhf run: no kubelet, no probes
    assert serve_probes(p, {workload_env.PROBES_ADDRESS: "127.0.0.1:notaport"}) is None  # logged, never fatal
    server = serve_probes(p, {workload_env.PROBES_ADDRESS: "127.0.0.1:0"})
    assert server is not None
    server.close()


# --- the plan: the generators' probes, none on the learner

OWNER = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")


def containers(spec: dict) -> dict[str, dict]:
    job = api.AsyncRLHFJob.model_validate({"metadata": {"name": "demo", "namespace": "team"}, "spec": spec})
    out = {}
    for child in plan.desired_children(job, OWNER, "nats://nats:4222"):
        if child["kind"] in ("Deployment", "Job"):
            out[child["metadata"]["name"]] = child["spec"]["template"]["spec"]["containers"][0]
    return out


@pytest.mark.parametrize("spec", [{}, {"metrics": {"port": 0}}], ids=["metrics-on", "metrics-off"])
def test_generators_get_probes_on_their_own_port_and_the_learner_none(spec):
    found = containers(spec)
    generator, learner = found["demo-generator"], found["demo-learner"]
    assert {"name": "probes", "containerPort": workload_env.PROBES_PORT} in generator["ports"]
    env = {e["name"]: e.get("value") for e in generator["env"]}
    assert env[workload_env.PROBES_ADDRESS] == f"0.0.0.0:{workload_env.PROBES_PORT}"
    get_ = {kind: generator[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert get_ == {"startupProbe": {"path": "/livez", "port": "probes"},
                    "livenessProbe": {"path": "/livez", "port": "probes"},
                    "readinessProbe": {"path": "/readyz", "port": "probes"}}
    assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(learner)


def test_probes_never_share_the_metrics_port():
    """metrics.port 8081 (the probes' default): the metrics server binds first, so the probe server
    could not, and the startup probe would restart the generator for ever."""
    generator = containers({"metrics": {"port": workload_env.PROBES_PORT}})["demo-generator"]
    ports = [p["containerPort"] for p in generator["ports"]]
    assert len(set(ports)) == len(ports) == 2
    probe_port = next(p["containerPort"] for p in generator["ports"] if p["name"] == "probes")
    env = {e["name"]: e.get("value") for e in generator["env"]}
    assert env[workload_env.PROBES_ADDRESS] == f"0.0.0.0:{probe_port}"


def test_the_startup_budget_covers_a_70b_load_and_liveness_outlasts_a_pause():
    probes_ = pods.generator_probes()
    startup = probes_["startupProbe"]["periodSeconds"] * probes_["startupProbe"]["failureThreshold"]
    load_70b = 140e9 / 100e6 + 300  # bf16 weights at 100 MB/s, plus vLLM compilation and graph capture
    assert startup >= 1.5 * load_70b and startup == 2700
    live = probes_["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] == 60  # on top of the endpoint's own stall limit


# --- a real generator process


def _state(port: int, path: str) -> tuple[int, str]:
    try:
        return get(port, path)
    except OSError as err:  # not listening yet (the engine is loading)
        return 0, str(err)


def _wait_for(port: int, path: str, status: int, proc: subprocess.Popen, timeout: float) -> list[tuple]:
    """Poll until `path` answers `status`; every distinct answer seen on the way."""
    seen: list[tuple] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the generator exited with {proc.returncode}"
        answer = _state(port, path)
        if not seen or seen[-1][0] != answer[0]:
            seen.append(answer)
        if answer[0] == status:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{path} never answered {status} within {timeout} s: {seen}")


async def _announce(url: str, bus: JobBus) -> None:
    """The stream the learner would create, and an announced snapshot (its load is slowed by the fault
    hook and then refused: the path does not exist, so the generator keeps its initial weights)."""
    nc = await connect(url)
    js = nc.jetstream()
    await ensure_job_resources(js, bus, max_bytes=64 << 20, ack_wait=2.0)
    ann = WeightsAnnouncement(version=1, path="/nonexistent/snapshots/v1", checksum="0" * 64)
    await publish(js, bus.subject(WEIGHTS), ann.encode(), msg_id="w-1")
    await nc.close()


@pytest.mark.slow
def test_a_generator_is_ready_after_its_weights_and_not_live_once_wedged(tmp_path):
    job = api.AsyncRLHFJob.model_validate({
        "metadata": {"name": "probed"},
        "spec": {"generator": {"engine": "hf", "sampling": {"maxTokens": 4}}, "nats": {"ackWaitSeconds": 2}}})
    config = tmp_path / "job.yaml"
    config.write_text(dump_manifest(job))
    port = free_port()
    with EmbeddedNats() as server:
        asyncio.run(_announce(server.url, JobBus(job.metadata.namespace, job.metadata.name)))
        env = {**os.environ, workload_env.NATS_URL: server.url, workload_env.GENERATOR_ID: "probed-0",
               workload_env.PROBES_ADDRESS: f"127.0.0.1:{port}",
               # a slow first load, then the loop wedged on its 4th pass (after 2 idle passes of 1 s)
               "ASYNCRLHF_FAULT": "reload:1:pause,generator-loop:4:hang"}
        env.pop("ASYNCRLHF_FAULT_ONCE", None)
        log = open(tmp_path / "generator.log", "wb")
        proc = subprocess.Popen([str(Path(sys.executable).parent / "asyncrlhf"), "generator", "--config", str(config)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ready = _wait_for(port, "/readyz", 503, proc, timeout=120)  # engine loaded, weights loading
            assert ready[-1] == (503, "the newest weights are not loaded yet"), ready
            assert _state(port, "/livez")[0] == 200  # loading weights is live
            _wait_for(port, "/readyz", 200, proc, timeout=15)
            assert _state(port, "/livez") == (200, "ok")  # waiting for prompts is live
            started = time.monotonic()
            live = _wait_for(port, "/livez", 503, proc, timeout=30)
            assert "the main loop has not moved" in live[-1][1], live
            assert time.monotonic() - started >= 5, "livez failed before the stall limit (10 s)"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()
    assert "fault injection: hang at generator-loop" in (tmp_path / "generator.log").read_text()
