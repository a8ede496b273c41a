"""Prometheus metrics of the learner and the generators: what a running job is doing, per process.

Each process has its own registry (several learners or generators can live in one test process)
served on `spec.metrics.port` (`$ASYNCRLHF_METRICS_ADDRESS`, host:port, overrides it: `asyncrlhf
run` gives each local process its own). The registry also carries the process's own process_*,
python_* and gc metrics and, in a vLLM generator, vLLM's `vllm:` metrics (from prometheus_client's
default registry, where vLLM registers them). Labels are the job, its namespace, the role and, for
generators, the generator id: nothing that grows with the run.

Counters that the learner's checkpoint keeps (rollouts consumed, dropped, dead) are read from its
state at scrape time, so they continue across a restart from the checkpoint; the rest count from
the process's start, as Prometheus expects of a counter. Names and help texts are in `CATALOGUE`,
the one list that docs/operator.md and the chart's dashboard are checked against.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

from prometheus_client import (
    REGISTRY, CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector, ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .natsserver import free_port

log = logging.getLogger("asyncrlhf.telemetry")
step_log = logging.getLogger("asyncrlhf.learner")

METRICS_ADDRESS = "ASYNCRLHF_METRICS_ADDRESS"  # host:port of this process's /metrics (overrides spec.metrics.port)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32, 64)
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
BUSY_WINDOW_SECONDS = 60.0
BUS_POLL_SECONDS = 5.0

# name (as scraped, without _bucket/_sum/_count), type, help
CATALOGUE: dict[str, tuple[str, str]] = {
    "asyncrlhf_start_time_seconds": ("gauge", "When this process started (Unix time): its changes count restarts."),
    "asyncrlhf_learner_step": ("gauge", "Optimizer steps done."),
    "asyncrlhf_learner_total_steps": ("gauge", "learner.totalSteps of the job."),
    "asyncrlhf_learner_policy_version": ("gauge", "Version of the newest snapshot the learner announced."),
    "asyncrlhf_learner_reward_mean": ("gauge", "Mean reward of the last step's rollouts."),
    "asyncrlhf_learner_samples_per_second": ("gauge", "Samples trained per second of training time, whole run."),
    "asyncrlhf_learner_staleness": ("histogram", "Policy versions each rollout group lagged the learner when used."),
    "asyncrlhf_learner_step_seconds": ("histogram", "Seconds of one training step (forward, backward, update)."),
    "asyncrlhf_learner_snapshot_seconds": ("histogram", "Seconds to write, announce and prune a snapshot "
                                                        "(its checkpoint not included)."),
    "asyncrlhf_learner_checkpoint_seconds": ("histogram", "Seconds to write a checkpoint."),
    "asyncrlhf_learner_snapshot_bytes": ("gauge", "Bytes of the newest snapshot (every file; the adapter alone "
                                         "in a LoRA run): what each generator reads per weight sync."),
    "asyncrlhf_learner_rollout_wait_seconds_total": ("counter", "Seconds the learner waited for its step's "
                                                                "rollouts (rate = the learner's wait fraction)."),
    "asyncrlhf_learner_samples_total": ("counter", "Samples (completions) of the rollout groups trained on."),
    "asyncrlhf_learner_rollouts_consumed_total": ("counter", "Rollout groups trained on (whole job)."),
    "asyncrlhf_learner_rollouts_dropped_total": ("counter", "Rollout groups dropped as too stale (whole job)."),
    "asyncrlhf_learner_rollouts_dead_total": ("counter", "Messages set aside in the dead letters (whole job)."),
    "asyncrlhf_bus_prompts_pending": ("gauge", "Prompts released and not yet answered (waiting or held)."),
    "asyncrlhf_bus_rollouts_pending": ("gauge", "Rollout groups published and not yet taken by the learner."),
    "asyncrlhf_bus_stream_bytes": ("gauge", "Bytes in the job's stream."),
    "asyncrlhf_bus_stream_max_bytes": ("gauge", "The stream's byte limit (nats.maxBytes)."),
    "asyncrlhf_generator_policy_version": ("gauge", "Policy version of the weights the generator holds."),
    "asyncrlhf_generator_reload_seconds": ("histogram", "Seconds to verify and load a snapshot."),
    "asyncrlhf_generator_rollouts_total": ("counter", "Rollout groups published."),
    "asyncrlhf_generator_samples_total": ("counter", "Completions generated and published."),
    "asyncrlhf_generator_tokens_total": ("counter", "Tokens generated and published."),
    "asyncrlhf_generator_busy_seconds_total": ("counter", "Seconds the engine spent generating."),
    "asyncrlhf_generator_busy_fraction": ("gauge", f"Fraction of the last {BUSY_WINDOW_SECONDS:.0f} s the engine "
                                                   "spent generating."),
    "asyncrlhf_generator_prompt_wait_seconds_total": ("counter", "Seconds idle because no prompt was there."),
    "asyncrlhf_generator_weights_wait_seconds_total": ("counter", "Seconds idle waiting for new enough weights."),
}
LABELS = ("job", "namespace", "role")


def _help(name: str) -> str:
    return CATALOGUE[name][1]


def _metric_name(name: str) -> str:
    """prometheus_client adds `_total` to counters itself."""
    return name[: -len("_total")] if name.endswith("_total") else name


class Telemetry:
    """One process's registry, its labels and its /metrics server."""

    role = ""

    def __init__(self, job: str, namespace: str, **extra_labels: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # the process's own process_*/python_* metrics (not the default registry's: in one
        # process with the operator, as in tests, that would serve the operator's metrics too)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.labels = {"job": job, "namespace": namespace, "role": self.role} | extra_labels
        self._server = None
        self._make(Gauge, "asyncrlhf_start_time_seconds").set(time.time())
        self.started = time.monotonic()  # the bus reports' uptime_seconds (autoscale.observe)

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def _make(self, kind, name: str, **kwargs):
        metric = kind(_metric_name(name), _help(name), list(self.labels), registry=self.registry, **kwargs)
        return metric.labels(**self.labels)

    def family(self, kind, name: str, value: float):
        family = kind(_metric_name(name), _help(name), labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def serve(self, port: int, env: Optional[dict] = None) -> Optional[str]:
        """Serve /metrics on $ASYNCRLHF_METRICS_ADDRESS, else 0.0.0.0:port (0: off); the URL or None."""
        host, port = listen_address(port, os.environ if env is None else env)
        if port == 0:
            return None
        try:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:  # metrics must never stop a job: it runs on without them
            log.warning("no metrics: cannot serve /metrics on %s:%d: %s", host, port, err)
            return None
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/metrics"
        log.info("metrics at %s", url)
        return url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Stopwatch:
    """Cumulative seconds of an activity, the one under way included: what the bus reports carry
    for the autoscaler (autoscale.observe differentiates two reads; a Prometheus counter only grows
    when the activity ends, so a long wait would show up late, all at once). Event-loop use."""

    def __init__(self) -> None:
        self.done = 0.0
        self.since: Optional[float] = None

    @contextmanager
    def running(self) -> Iterator[None]:
        self.since = time.monotonic()
        try:
            yield
        finally:
            self.done += time.monotonic() - self.since
            self.since = None

    def seconds(self) -> float:
        return self.done + (time.monotonic() - self.since if self.since is not None else 0.0)


def listen_address(port: int, env) -> tuple[str, int]:
    """(host, port) of /metrics: the environment's host:port, else every address on the spec's port."""
    given = env.get(METRICS_ADDRESS, "")
    if not given:
        return "0.0.0.0", port
    host, _, number = given.rpartition(":")
    return host or "0.0.0.0", int(number)


class LearnerTelemetry(Telemetry):
    """The learner's metrics: its progress, its timings and the job's bus backlog."""

    role = "learner"

    def __init__(self, job: str, namespace: str, state=None, samples_per_prompt: int = 1, total_steps: int = 0):
        super().__init__(job, namespace)
        self.state, self.samples_per_prompt, self.total_steps = state, samples_per_prompt, total_steps
        self.reward = self._make(Gauge, "asyncrlhf_learner_reward_mean")
        self.samples_per_second = self._make(Gauge, "asyncrlhf_learner_samples_per_second")
        self.staleness = self._make(Histogram, "asyncrlhf_learner_staleness", buckets=STALENESS_BUCKETS)
        self.step_seconds = self._make(Histogram, "asyncrlhf_learner_step_seconds", buckets=SECONDS_BUCKETS)
        self.snapshot_seconds = self._make(Histogram, "asyncrlhf_learner_snapshot_seconds", buckets=SECONDS_BUCKETS)
        self.checkpoint_seconds = self._make(Histogram, "asyncrlhf_learner_checkpoint_seconds",
                                             buckets=SECONDS_BUCKETS)
        self.snapshot_bytes = self._make(Gauge, "asyncrlhf_learner_snapshot_bytes")
        self.waited = self._make(Counter, "asyncrlhf_learner_rollout_wait_seconds_total")
        self.bus = {name: self._make(Gauge, name) for name in CATALOGUE if name.startswith("asyncrlhf_bus_")}
        self._checkpointed = 0.0  # checkpoint seconds inside the publish being timed
        self._bus_polled = 0.0
        self.wait_clock = Stopwatch()
        self.prompts_pending: Optional[int] = None  # the last poll's: prompts no generator has taken
        self.registry.register(self)

    def collect(self):
        """The counters and gauges read from the learner's state (kept in its checkpoint)."""
        st = self.state
        if st is None:
            return
        # read together first: the learner goes on stepping while a scrape is written out
        step, version, consumed, dropped, dead = st.step, st.published_version, st.consumed, st.dropped, st.dead
        yield self.family(GaugeMetricFamily, "asyncrlhf_learner_step", step)
        yield self.family(GaugeMetricFamily, "asyncrlhf_learner_total_steps", self.total_steps)
        yield self.family(GaugeMetricFamily, "asyncrlhf_learner_policy_version", version)
        yield self.family(CounterMetricFamily, "asyncrlhf_learner_samples_total", consumed * self.samples_per_prompt)
        for what, value in (("consumed", consumed), ("dropped", dropped), ("dead", dead)):
            yield self.family(CounterMetricFamily, f"asyncrlhf_learner_rollouts_{what}_total", value)

    def describe(self):
        return []  # collected at scrape time: nothing to check at registration

    @contextmanager
    def waiting(self) -> Iterator[None]:
        started = time.monotonic()
        try:
            with self.wait_clock.running():
                yield
        finally:
            self.waited.inc(time.monotonic() - started)

    def bus_signals(self) -> dict:
        """The learner's progress fields the autoscaler reads (LearnerProgress)."""
        return {"rollout_wait_seconds": self.wait_clock.seconds(), "uptime_seconds": self.uptime(),
                "prompts_pending": self.prompts_pending}

    @contextmanager
    def publishing(self) -> Iterator[None]:
        """Times a publish; the checkpoint written inside it is its own histogram."""
        started, self._checkpointed = time.monotonic(), 0.0
        yield
        self.snapshot_seconds.observe(max(0.0, time.monotonic() - started - self._checkpointed))

    @contextmanager
    def checkpointing(self) -> Iterator[None]:
        started = time.monotonic()
        yield
        self._checkpointed = time.monotonic() - started
        self.checkpoint_seconds.observe(self._checkpointed)

    def observe_step(self, row: dict, staleness: list[int], samples_per_second: float) -> None:
        """One step's metrics, and the step's line in the learner's log (`kubectl logs -f`)."""
        self.reward.set(row["reward_mean"])
        self.samples_per_second.set(samples_per_second)
        self.step_seconds.observe(row["step_seconds"])
        for lag in staleness:
            self.staleness.observe(lag)
        step_log.info("step %d/%d reward %.4f staleness %.2f (max %d) samples/s %.1f step %.2f s loss %s",
                 row["step"], self.total_steps, row["reward_mean"], row["staleness_mean"], row["staleness_max"],
                 samples_per_second, row["step_seconds"], _short(row.get("loss")))

    async def observe_bus(self, js, bus, prompts_consumer: str, rollouts_consumer: str) -> None:
        """The job's backlog, at most every BUS_POLL_SECONDS (three small requests); skipped when the
        bus does not answer (the metrics keep their last values)."""
        now = time.monotonic()
        if js is None or now - self._bus_polled < BUS_POLL_SECONDS:
            return
        self._bus_polled = now
        try:
            prompts = await js.consumer_info(bus.stream, prompts_consumer, timeout=2.0)
            rollouts = await js.consumer_info(bus.stream, rollouts_consumer, timeout=2.0)
            stream = await js.stream_info(bus.stream)
        except Exception as err:  # noqa: BLE001 -- a metric must never stop the learner
            log.debug("bus backlog not read: %s", err)
            return
        self.bus["asyncrlhf_bus_prompts_pending"].set((prompts.num_pending or 0) + (prompts.num_ack_pending or 0))
        self.prompts_pending = prompts.num_pending or 0
        self.bus["asyncrlhf_bus_rollouts_pending"].set(rollouts.num_pending or 0)
        self.bus["asyncrlhf_bus_stream_bytes"].set(stream.state.bytes or 0)
        self.bus["asyncrlhf_bus_stream_max_bytes"].set(stream.config.max_bytes or 0)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


class BusyWindow:
    """The fraction of the last `window` seconds a cumulative busy-seconds counter grew by."""

    def __init__(self, window: float = BUSY_WINDOW_SECONDS) -> None:
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()

    def fraction(self, now: float, busy_total: float) -> float:
        self.samples.append((now, busy_total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        then, busy_then = self.samples[0]
        return min(1.0, max(0.0, (busy_total - busy_then) / (now - then))) if now > then else 0.0


class GeneratorTelemetry(Telemetry):
    """A generator's metrics: its weights, what it produced, and where its time went."""

    role = "generator"

    def __init__(self, job: str, namespace: str, generator_id: str, state=None) -> None:
        super().__init__(job, namespace, generator=generator_id)
        self.state = state
        self.reload_seconds = self._make(Histogram, "asyncrlhf_generator_reload_seconds", buckets=SECONDS_BUCKETS)
        self.prompt_wait = self._make(Counter, "asyncrlhf_generator_prompt_wait_seconds_total")
        self.weights_wait = self._make(Counter, "asyncrlhf_generator_weights_wait_seconds_total")
        self.window = BusyWindow()
        self.clocks = {id(self.prompt_wait): Stopwatch(), id(self.weights_wait): Stopwatch()}  # bus_signals
        self.registry.register(self)
        self.registry.register(Borrowed("vllm:", self.labels))

    def collect(self):
        """Counters read from the generator's state (GeneratorState) at scrape time."""
        st = self.state
        if st is None:
            return
        version, rollouts, samples, tokens, busy = st.version, st.rollouts, st.samples, st.tokens, st.busy_seconds
        yield self.family(GaugeMetricFamily, "asyncrlhf_generator_policy_version", version)
        yield self.family(CounterMetricFamily, "asyncrlhf_generator_rollouts_total", rollouts)
        yield self.family(CounterMetricFamily, "asyncrlhf_generator_samples_total", samples)
        yield self.family(CounterMetricFamily, "asyncrlhf_generator_tokens_total", tokens)
        yield self.family(CounterMetricFamily, "asyncrlhf_generator_busy_seconds_total", busy)
        fraction = self.window.fraction(time.monotonic(), busy)
        yield self.family(GaugeMetricFamily, "asyncrlhf_generator_busy_fraction", fraction)

    def describe(self):
        return []

    @contextmanager
    def timed(self, counter_or_histogram) -> Iterator[None]:
        started = time.monotonic()
        try:
            clock = self.clocks.get(id(counter_or_histogram))
            with clock.running() if clock is not None else nullcontext():
                yield
        finally:
            elapsed = time.monotonic() - started
            if isinstance(counter_or_histogram, Histogram):
                counter_or_histogram.observe(elapsed)
            else:
                counter_or_histogram.inc(elapsed)


    def bus_signals(self) -> dict:
        """The report fields the autoscaler reads (GeneratorStatus), cumulative in this process."""
        busy = self.state.busy_seconds if self.state is not None else 0.0
        return {"busy_seconds": busy, "prompt_wait_seconds": self.clocks[id(self.prompt_wait)].seconds(),
                "weights_wait_seconds": self.clocks[id(self.weights_wait)].seconds(), "uptime_seconds": self.uptime()}


class Borrowed:
    """A library's own metrics, from prometheus_client's default registry, with our labels added:
    vLLM's engine registers its `vllm:` metrics there when its stats are on (vllm_engine.py)."""

    def __init__(self, prefix: str, labels: dict[str, str]) -> None:
        self.prefix, self.labels = prefix, labels

    def collect(self):
        for family in REGISTRY.collect():
            if family.name.startswith(self.prefix):  # a copy: a collector may hand out the same object
                copy = Metric(family.name, family.documentation, family.type, family.unit)
                copy.samples = [s._replace(labels=s.labels | self.labels) for s in family.samples]
                yield copy

    def describe(self):
        return []


class LocalPorts:
    """`asyncrlhf run`: each local process's /metrics on a free port of 127.0.0.1 (two runs on one
    machine, or anything else listening on spec.metrics.port, cannot collide with it), printed at
    start; a restarted process keeps its port. Nothing when spec.metrics.port is 0."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.ports: dict[str, int] = {}

    def env(self, role: str, index: int) -> dict[str, str]:
        if not self.base or (role == "learner" and index > 0):  # only rank 0 talks to the bus and serves
            return {}
        name = f"{role}-{index}"
        if name not in self.ports:
            self.ports[name] = free_port()
        return {METRICS_ADDRESS: f"127.0.0.1:{self.ports[name]}"}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/metrics"

    def describe(self) -> str:
        return "metrics: " + ", ".join(f"{name} {self.url(name)}" for name in self.ports)


def exported_names(telemetry: Telemetry) -> set[str]:
    """Every sample name the telemetry serves (histograms' _bucket/_sum/_count included)."""
    return {s.name for family in telemetry.registry.collect() for s in family.samples}
