"""Processes stop when told: `asyncrlhf run` takes its children down with it (none needs its
SIGKILL), and a generator or learner whose bus is gone exits at once on SIGTERM, by itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from asyncrlhf.bus import EmbeddedNats, JobBus, connect, ensure_job_resources
from asyncrlhf.kv import JobKV
from asyncrlhf.local_generators import STOP_GRACE_SECONDS
from asyncrlhf.shutdown import EXIT_STOPPED, GRACE_SECONDS, STRANDED_CHECK_SECONDS, Stranded, unless_stranded

pytestmark = pytest.mark.slow

JOB = {
    "apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "stop-me"},
    "spec": {
        "model": {"policy": "builtin:tiny-sort"},
        "generator": {"engine": "hf", "sampling": {"maxTokens": 6}},
        "learner": {"promptsPerStep": 4, "totalSteps": 400},
        "algorithm": {"samplesPerPrompt": 4},
    },
}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_to_asyncrlhf_run_stops_every_child(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(JOB))
    run = subprocess.Popen([sys.executable, "-m", "asyncrlhf.cli", "run", str(manifest), "--quiet",
                            "--runs-dir", str(tmp_path / "runs")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "runs" / "stop-me" / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 180, "the first step")
        family = psutil.Process(run.pid).children(recursive=True)
        assert len(family) >= 3  # nats-server, a generator, a learner
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        run.wait(60)
        stopped = time.monotonic() - started
        wait_for(lambda: not alive(family), 10, "the children to be gone")
    finally:
        if run.poll() is None:
            run.kill()
    log = (tmp_path / "runs" / "stop-me" / "run.log").read_text()
    ended = [line for line in log.splitlines() if "children stopped:" in line]
    # each child ended by itself (its own handler, or its watchdog at shutdown.GRACE_SECONDS), none
    # had to wait for the runner's SIGKILL at STOP_GRACE_SECONDS
    assert len(ended) == 1 and "learner-0" in ended[0] and "generator-0" in ended[0], log[-2000:]
    assert "killed" not in ended[0], log[-2000:]
    assert stopped < STOP_GRACE_SECONDS, f"asyncrlhf run took {stopped:.1f} s to stop:\n{log[-2000:]}"


@pytest.mark.parametrize("role", ["generator", "learner"])
def test_a_workload_whose_bus_is_gone_exits_by_itself_soon_after_sigterm(tmp_path, role):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(JOB))
    server = EmbeddedNats().start()
    env = dict(os.environ, ASYNCRLHF_NATS_URL=server.url, GENERATOR_ID="g0", ASYNCRLHF_SNAPSHOT_DIR=str(tmp_path / "volume"),
               ASYNCRLHF_RUN_DIR=str(tmp_path / "run"))
    log = open(tmp_path / f"{role}.log", "wb")

    async def make_stream() -> None:
        nc = await connect(server.url)
        await ensure_job_resources(nc.jetstream(), JobBus("default", "stop-me"), 1 << 24, 30)
        await nc.close()

    asyncio.run(make_stream())
    proc = subprocess.Popen([sys.executable, "-m", "asyncrlhf.cli", role, "--config", str(manifest)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _reported(server.url, role), 120, f"the {role}'s first report")
        server.close()  # the bus is gone
        time.sleep(2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        stopped = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    text = (tmp_path / f"{role}.log").read_text()
    # it noticed the bus was away and left at once: no request waited out its timeout, the
    # watchdog (after shutdown.GRACE_SECONDS) was not needed. A generator exits 0; a learner
    # stopped before its last step exits EXIT_STOPPED (to a Job, 0 would be a completion)
    assert proc.returncode == (EXIT_STOPPED if role == "learner" else 0), text[-3000:]
    assert "stopping with the bus away" in text and "still running" not in text, text[-3000:]
    assert stopped < GRACE_SECONDS, f"the {role} took {stopped:.1f} s to exit after SIGTERM"


def _reported(url: str, role: str) -> bool:
    async def check() -> bool:
        nc = await connect(url)
        try:
            kv = await JobKV.open(nc.jetstream(), JobBus("default", "stop-me").bucket)
            return bool(await kv.reports()) if role == "generator" else await kv.progress() is not None
        finally:
            await nc.close()

    return asyncio.run(check())


async def test_unless_stranded_cuts_work_short_only_when_stopping_with_the_bus_away():
    stopping, connected = asyncio.Event(), [True]

    async def forever() -> None:
        await asyncio.sleep(3600)

    assert await unless_stranded(asyncio.sleep(0.01, "done"), stopping, lambda: connected[0]) == "done"
    stopping.set()  # stopping, the bus there: the work goes on (it hands its prompts back)
    assert await unless_stranded(asyncio.sleep(0.7, "handed back"), stopping, lambda: connected[0]) == "handed back"
    work = asyncio.ensure_future(forever())
    connected[0] = False
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Stranded):
        await unless_stranded(work, stopping, lambda: connected[0])
    assert loop.time() - started <= 2 * STRANDED_CHECK_SECONDS + 0.5
    assert work.cancelled()  # and done: its cleanup ran before unless_stranded returned
    cleaned = []

    async def with_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # e.g. a keep-alive task cancelled, a log closed
            cleaned.append(True)

    with pytest.raises(Stranded):
        await unless_stranded(with_cleanup(), stopping, lambda: connected[0])
    assert cleaned == [True]
    stopping.clear()  # the bus away but not stopping: the work goes on (nats-py reconnects)
    assert await unless_stranded(asyncio.sleep(0.7, "later"), stopping, lambda: connected[0]) == "later"


async def test_unless_stranded_cancels_its_work_with_its_caller():
    work = asyncio.ensure_future(asyncio.sleep(3600))
    caller = asyncio.ensure_future(unless_stranded(work, asyncio.Event(), lambda: True))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert work.cancelled()
