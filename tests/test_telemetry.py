"""Prometheus metrics of the learner and the generators (telemetry.py): the catalogue, the labels,
the local ports, and a real local run scraped while it trains."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from asyncrlhf.api import AsyncRLHFJob, JobSpec
from asyncrlhf.checkpoints import LearnerState
from asyncrlhf.engines.vllm_engine import vllm_options
from asyncrlhf.generator import GeneratorState
from asyncrlhf.local import LocalRun
from asyncrlhf.logs import STATS_LOGGER, vllm_config
from asyncrlhf.telemetry import (
    CATALOGUE, METRICS_ADDRESS, BusyWindow, GeneratorTelemetry, LearnerTelemetry, LocalPorts, exported_names,
    listen_address,
)


def _both():
    learner = LearnerTelemetry("tiny", "team-a", LearnerState(step=3, consumed=12, dropped=1), 4, 10)
    generator = GeneratorTelemetry("tiny", "team-a", "gen-0", GeneratorState(version=2, tokens=50, samples=8))
    return learner, generator


def _ours(names):
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names
            if n.startswith("asyncrlhf_") and not n.endswith("_created")}  # _created: prometheus_client's own


def test_every_catalogued_metric_is_exported_and_nothing_else():
    learner, generator = _both()
    assert _ours(exported_names(learner) | exported_names(generator)) == set(CATALOGUE)


def test_labels_are_job_namespace_role_and_generator_id_only():
    learner, generator = _both()
    for telemetry, labels in ((learner, {"job", "namespace", "role"}),
                              (generator, {"job", "namespace", "role", "generator"})):
        text = generate_latest(telemetry.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("asyncrlhf_"):
                    assert set(sample.labels) - {"le"} == labels, sample
                    assert sample.labels["namespace"] == "team-a"


def test_state_counters_are_read_at_scrape_time():
    learner, generator = _both()
    text = generate_latest(learner.registry).decode()
    assert 'asyncrlhf_learner_rollouts_consumed_total{job="tiny",namespace="team-a",role="learner"} 12.0' in text
    assert 'asyncrlhf_learner_samples_total{job="tiny",namespace="team-a",role="learner"} 48.0' in text
    learner.state.consumed = 20
    assert "asyncrlhf_learner_rollouts_consumed_total" in generate_latest(learner.registry).decode()
    assert 'role="learner"} 20.0' in generate_latest(learner.registry).decode()
    assert 'asyncrlhf_generator_policy_version{generator="gen-0",job="tiny",namespace="team-a",role="generator"} 2.0' \
        in generate_latest(generator.registry).decode()


def test_snapshot_seconds_leave_the_checkpoint_out():
    learner, _ = _both()
    with learner.publishing():
        with learner.checkpointing():
            time.sleep(0.05)
    snapshot = learner.snapshot_seconds._sum.get()
    checkpoint = learner.checkpoint_seconds._sum.get()
    assert checkpoint >= 0.05 and snapshot < 0.04


@pytest.mark.parametrize("samples, expected", [
    ([(0, 0), (10, 5)], 0.5),
    ([(0, 0), (10, 10), (70, 10), (80, 15)], 5 / 70),  # the window drops what is older than 60 s
    ([(0, 0), (1, 2)], 1.0),  # clipped
    ([(5, 3)], 0.0),
])
def test_busy_window(samples, expected):
    window = BusyWindow(60.0)
    for now, busy in samples:
        fraction = window.fraction(now, busy)
    assert fraction == pytest.approx(expected)


def test_a_generator_serves_vllms_own_metrics_with_its_labels():
    """vLLM registers its `vllm:` metrics in prometheus_client's default registry; the generator's
    endpoint serves those (with job, namespace, role, generator added), not the rest of it."""
    engine = Counter("vllm:test_tokens", "Tokens (a name vLLM does not use: its own may be registered).", ["model_name", "engine"])
    other = Counter("someone_elses", "Not ours.")
    try:
        engine.labels("tiny", "0").inc(30)
        _, generator = _both()
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(generator.registry).decode())}
        (sample,) = [s for s in families["vllm:test_tokens"].samples if s.name.endswith("_total")]
        assert sample.value == 30 and sample.labels == {"model_name": "tiny", "engine": "0", "job": "tiny",
                                                        "namespace": "team-a", "role": "generator",
                                                        "generator": "gen-0"}
        assert "someone_elses" not in families
        learner, _ = _both()
        assert not [n for n in exported_names(learner) if n.startswith("vllm:")]  # the learner has no engine
    finally:
        REGISTRY.unregister(engine)
        REGISTRY.unregister(other)


@pytest.mark.parametrize("port, stats", [(9410, True), (0, False)])
def test_vllm_keeps_stats_only_when_metrics_are_served(port, stats):
    options = vllm_options(JobSpec.model_validate({"metrics": {"port": port}}), on_cpu=True)
    assert options["disable_log_stats"] is not stats


@pytest.mark.parametrize("verbose, level", [(False, "WARNING"), (True, "DEBUG")])
def test_vllms_periodic_stats_line_is_off_in_the_logs_unless_verbose(verbose, level):
    # vLLM creates its LoggingStatLogger only when this logger is enabled for INFO
    assert vllm_config(verbose)["loggers"][STATS_LOGGER] == {"level": level}


def test_listen_address_and_local_ports():
    assert listen_address(9410, {}) == ("0.0.0.0", 9410)
    assert listen_address(9410, {METRICS_ADDRESS: "127.0.0.1:5000"}) == ("127.0.0.1", 5000)
    assert listen_address(0, {}) == ("0.0.0.0", 0)
    assert LocalPorts(0).env("learner", 0) == {}
    ports = LocalPorts(9410)
    first = ports.env("generator", 3)
    assert first == ports.env("generator", 3)  # a restarted process keeps its port
    assert ports.env("learner", 1) == {}  # only rank 0 serves
    learner = ports.env("learner", 0)[METRICS_ADDRESS]
    assert learner != first[METRICS_ADDRESS] and learner.startswith("127.0.0.1:")
    assert ports.describe().startswith("metrics: generator-3 http://127.0.0.1:")


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(("asyncrlhf_", "vllm:")) and "le" not in s.labels}


async def _scrape_while_running(run: LocalRun) -> list[tuple[dict, dict]]:
    """(generator, learner) scrapes, the generator first, until the learner has stepped 3 times
    and the generator holds v2, or the run ends."""
    task = asyncio.create_task(run.run())
    seen: list[tuple[dict, dict]] = []
    while not task.done():
        await asyncio.sleep(0.1)
        if {"learner-0", "generator-0"} - set(run.metrics_ports.ports):
            continue
        try:
            generator = await asyncio.to_thread(_scrape, run.metrics_ports.url("generator-0"))
            learner = await asyncio.to_thread(_scrape, run.metrics_ports.url("learner-0"))
        except OSError:  # not serving yet (still importing torch)
            continue
        seen.append((generator, learner))
        if learner.get("asyncrlhf_learner_step", 0) >= 3 and generator["asyncrlhf_generator_policy_version"] >= 2:
            break
    result = await task
    assert result.ok
    return seen


@pytest.mark.slow
def test_a_local_run_serves_metrics_that_follow_training(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "1")  # vLLM's stats log line, were it on: every second
    job = AsyncRLHFJob.model_validate({
        "apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "scraped"},
        "spec": {"model": {"policy": "builtin:tiny-sort"},
                 "algorithm": {"loss": "online-dpo", "samplesPerPrompt": 2},
                 "generator": {"engine": "vllm", "kvCacheGiB": 0.25, "sampling": {"maxTokens": 8}},
                 "learner": {"promptsPerStep": 4, "totalSteps": 12}, "nats": {"ackWaitSeconds": 4}},
    })
    run = LocalRun(job, tmp_path / "scraped", quiet=True)
    seen = asyncio.run(_scrape_while_running(run))
    assert run.restarts == 0 and len([c for c in run.children if c.role == "generator"]) == 1  # nothing died

    steps = [learner["asyncrlhf_learner_step"] for _, learner in seen if "asyncrlhf_learner_step" in learner]
    assert steps == sorted(steps) and len(set(steps)) >= 2 and steps[-1] >= 3  # the step advances
    versions = [generator["asyncrlhf_generator_policy_version"] for generator, _ in seen]
    assert versions == sorted(versions) and versions[-1] >= 2  # the generator's weights move on ...
    for generator, learner in seen:  # ... and never ahead of what the learner published
        assert generator["asyncrlhf_generator_policy_version"] <= learner.get("asyncrlhf_learner_policy_version", 0)
    last_generator, last_learner = seen[-1]
    assert last_generator["asyncrlhf_generator_samples_total"] >= 2 * 4 * 2  # batches 0 and 1 at least
    # step and samples are read together, but the learner sets the step before it counts the step's groups
    step = last_learner["asyncrlhf_learner_step"]
    assert 2 * 4 * (step - 1) <= last_learner["asyncrlhf_learner_samples_total"] <= 2 * 4 * step
    assert last_learner["asyncrlhf_learner_rollout_wait_seconds_total"] > 0
    # the newest snapshot's bytes: every snapshot of a full model weighs the same but for the version
    # digits in its manifest (the scrape saw an earlier one than the volume's newest now)
    from asyncrlhf.publishing import tree_bytes
    from asyncrlhf.snapshots import list_versions, snapshot_dir

    newest = tree_bytes(snapshot_dir(run.volume, list_versions(run.volume)[-1]))
    assert newest > 200_000  # tiny-sort: ~270 kB
    assert abs(last_learner["asyncrlhf_learner_snapshot_bytes"] - newest) <= 8
    # vLLM's own metrics, on the same endpoint: every completion's tokens counted by its engine too
    assert last_generator["vllm:generation_tokens_total"] >= last_generator["asyncrlhf_generator_tokens_total"] > 0
    assert "Avg prompt throughput" not in (run.run_dir / "generator-0.log").read_text()  # its stats log is off
    # one line per step in the learner's log (a pod's `kubectl logs -f`)
    log = (run.run_dir / "learner-0.log").read_text()
    assert re.search(r"step 1/12 reward [-0-9.]+ staleness", log) and "step 12/12 reward" in log
