"""TBA in full: S > K generation (the buffer keeps all S, each step trains on K), the temperature of
reward-prioritised replay sampling, searcher groups that sync every k snapshots, and their plan
(one Deployment per group). Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import random
from typing import Any

import pytest
from scipy.stats import chisquare

from asyncrlhf import api
from asyncrlhf.generator import sync_due
from asyncrlhf.replay import ReplayBuffer, ReplayItem, generated_samples
from asyncrlhf.workload_env import SEARCHER, WorkloadEnv
from asyncrlhf_operator import plan

OWNER = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")
NATS = "nats://nats.asyncrlhf-system.svc:4222"


def spec(**fields: Any) -> api.JobSpec:
    fields.setdefault("model", {"policy": "builtin:tiny-sort"})
    return api.JobSpec.model_validate(fields)


def job(**fields: Any) -> api.AsyncRLHFJob:
    fields.setdefault("model", {"policy": "builtin:tiny-sort"})
    return api.AsyncRLHFJob.model_validate(
        {"metadata": {"name": OWNER.name, "namespace": OWNER.namespace}, "spec": fields})


# --- S > K: generate S, train on K ------------------------------------------------------------


@pytest.mark.parametrize("fields,expected", [
    ({"algorithm": {"loss": "tb", "samplesPerPrompt": 4}, "async": {"replayBuffer": {"generateSamples": 6}}}, 6),
    ({"algorithm": {"loss": "tb", "samplesPerPrompt": 4}}, 4),  # 0 = K
    # the buffer is off (online DPO's default): S is ignored, the generators make K
    ({"algorithm": {"loss": "online-dpo", "samplesPerPrompt": 4},
      "async": {"replayBuffer": {"generateSamples": 6}}}, 4),
    ({"algorithm": {"loss": "online-dpo", "samplesPerPrompt": 4},
      "async": {"replayBuffer": {"enabled": True, "generateSamples": 6}}}, 6),
])
def test_generated_samples_is_s_when_the_buffer_is_on(fields, expected):
    assert generated_samples(spec(**fields)) == expected


def test_s_below_k_is_refused_with_both_names():
    with pytest.raises(ValueError, match="generateSamples.*samplesPerPrompt"):
        spec(algorithm={"loss": "tb", "samplesPerPrompt": 4}, **{"async": {"replayBuffer": {"generateSamples": 3}}})


def test_a_step_keeps_k_distinct_of_the_s_fresh_completions():
    # S = 6 fresh completions of prompt "p" after a sync (all recent), m = 1: each draw of K = 4
    # takes 4 distinct items of the 6, never an older one (the old item has score 1, the best)
    buf = ReplayBuffer(capacity=100, recency_probability=1.0)
    buf.add(ReplayItem("p", (99,), 1.0, policy_version=0))
    buf.mark_sync()
    buf.extend([ReplayItem("p", (t,), 0.1 * t, policy_version=1) for t in range(6)])
    rng = random.Random(0)
    for _ in range(200):
        [drawn] = buf.sample(prompt_ids=["p"], k=4, rng=rng)
        tokens = [i.tokens for i in drawn]
        assert len(set(tokens)) == 4 and all(t[0] < 6 for t in tokens)


# --- temperature ------------------------------------------------------------------------------


def _reward_buffer(tau: float, m: float = 0.0) -> ReplayBuffer:
    buf = ReplayBuffer(capacity=100, recency_probability=m, sampling="reward", temperature=tau)
    buf.add(ReplayItem("p", (0,), 0.0, policy_version=0))
    buf.add(ReplayItem("p", (1,), 1.0, policy_version=0))
    buf.mark_sync()
    buf.add(ReplayItem("p", (2,), 0.5, policy_version=1))  # the one recent item
    return buf


@pytest.mark.parametrize("tau,m,expected", [
    # τ = 1, m = 0: softmax(0, 1, 0.5) = (1, e, e^0.5) / (1 + e + e^0.5) = (1, 2.71828, 1.64872) / 5.36700
    (1.0, 0.0, {(0,): 0.186324, (1,): 0.506480, (2,): 0.307196}),
    # τ = 0.1: scores / τ = (0, 10, 5): (1, 22026.47, 148.41) / 22175.88
    (0.1, 0.0, {(0,): 1 / 22175.88, (1,): 22026.47 / 22175.88, (2,): 148.41 / 22175.88}),
    # τ = 1, m = 0.5: the recent item gets 0.5 on top of half its softmax share
    (1.0, 0.5, {(0,): 0.093162, (1,): 0.253240, (2,): 0.5 + 0.153598}),
])
def test_reward_sampling_probabilities_follow_softmax_of_score_over_tau(tau, m, expected):
    probs = _reward_buffer(tau, m).probabilities("p")
    assert probs.keys() == expected.keys()
    for tokens, p in expected.items():
        assert probs[tokens] == pytest.approx(p, rel=1e-4)


@pytest.mark.parametrize("tau", [1.0, 0.2])
def test_reward_sampling_draws_match_the_probabilities(tau):
    buf = _reward_buffer(tau, m=0.3)
    probs = buf.probabilities("p")
    rng = random.Random(1)
    counts = {t: 0 for t in probs}
    n = 10_000
    for _ in range(n):
        [[item]] = buf.sample(prompt_ids=["p"], k=1, rng=rng)
        counts[item.tokens] += 1
    observed = [counts[t] for t in probs]
    assert chisquare(observed, [n * probs[t] for t in probs]).pvalue > 1e-3
    # power: the τ = 1 counts reject τ = 0.2's probabilities and the other way round
    other = _reward_buffer(1.2 - tau, m=0.3).probabilities("p")
    assert chisquare(observed, [n * other[t] for t in probs]).pvalue < 1e-3


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        ReplayBuffer(capacity=1, recency_probability=0.5, sampling="reward", temperature=0.0)
    assert ReplayBuffer.from_spec(api.ReplayBufferSpec(temperature=0.25)).temperature == 0.25


# --- searchers: sync every k ------------------------------------------------------------------


@pytest.mark.parametrize("held,newest,gap,need,due", [
    (0, 1, 1, 0, True),    # the default group (syncEvery 1, everySteps 1) loads every snapshot
    (4, 5, 3, 0, False),   # syncEvery 3: v5 is 1 ahead of v4, 3 needed
    (4, 6, 3, 0, False),
    (4, 7, 3, 0, True),    # 3 ahead
    (4, 9, 3, 0, True),
    (4, 5, 3, 5, True),    # a prompt's staleness bound needs v5: the bound wins
    (4, 6, 3, 4, False),   # ... a bound v4 already meets does not
    (8, 2, 3, 0, True),    # an older version announced: the learner restarted from a checkpoint
    (4, 4, 3, 0, True),    # same version, other weights (the caller only asks when the checksum differs)
    (0, 4, 8, 0, False),   # syncEvery 4 x everySteps 2: versions 2, 4, 6 ... load at +8
    (0, 8, 8, 0, True),
])
def test_sync_due(held, newest, gap, need, due):
    assert sync_due(held, newest, gap, need) is due


def test_a_searcher_loads_every_k_th_snapshot_along_a_run():
    # syncEvery 3, everySteps 1, snapshots v1..v10 announced one after the other, no bound:
    # held 0 → loads v3 → v6 → v9 (the versions it answers with lag 0, 1, 2 behind the newest)
    held, loaded = 0, []
    for newest in range(1, 11):
        if sync_due(held, newest, 3):
            held = newest
            loaded.append(newest)
    assert loaded == [3, 6, 9]


def test_groups_carve_replicas_default_first():
    g = spec(generator={"replicas": 5, "searchers": [{"name": "a", "replicas": 1, "syncEvery": 2},
                                                      {"name": "b", "replicas": 2, "syncEvery": 4}]},
             **{"async": {"maxStaleness": 3}}).generator
    assert [(x.name, x.replicas, x.sync_every) for x in g.groups()] == [("", 2, 1), ("a", 1, 2), ("b", 2, 4)]
    assert [g.group_of(i).name for i in range(5)] == ["", "", "a", "b", "b"]
    assert g.group_named("b").sync_every == 4
    with pytest.raises(ValueError, match="no generator group named 'c'"):
        g.group_named("c")
    with pytest.raises(IndexError):
        g.group_of(5)


@pytest.mark.parametrize("generator,extra,match", [
    ({"replicas": 2, "searchers": [{"name": "a", "replicas": 3}]}, {}, "add up to 3, more than generator.replicas"),
    ({"replicas": 4, "searchers": [{"name": "a"}, {"name": "a"}]}, {}, "unique"),
    ({"replicas": 2, "autoscale": {"enabled": True, "minReplicas": 1, "maxReplicas": 4},
      "searchers": [{"name": "a"}]}, {}, "cannot be combined"),
    ({"replicas": 2, "searchers": [{"name": "a", "syncEvery": 4}]}, {"async": {"maxStaleness": 2}},
     "raise async.maxStaleness"),
    ({"replicas": 2, "searchers": [{"name": "Bad_Name"}]}, {}, "name"),
])
def test_bad_searchers_are_refused(generator, extra, match):
    with pytest.raises(ValueError, match=match):
        spec(generator=generator, **extra)


def test_searcher_rules_agree_in_cel():
    from test_crd import cel_failures, manifest

    ok = manifest(generator={"replicas": 2, "searchers": [{"name": "a", "replicas": 1, "syncEvery": 4}]},
                  **{"async": {"maxStaleness": 3}})
    bad = manifest(generator={"replicas": 2, "searchers": [{"name": "a", "replicas": 1, "syncEvery": 4}]},
                   **{"async": {"maxStaleness": 2}})
    s_below_k = manifest(algorithm={"loss": "tb", "samplesPerPrompt": 4},
                         **{"async": {"replayBuffer": {"generateSamples": 3}}})
    assert cel_failures(ok) == []
    assert cel_failures(bad) == [".generator.searchers"]
    assert cel_failures(s_below_k) == [".async.replayBuffer.generateSamples"]


def test_the_generator_environment_names_its_group():
    env = WorkloadEnv.for_generator({"ASYNCRLHF_NATS_URL": NATS, SEARCHER: "slow"})
    assert env.searcher == "slow" and env.variables()[SEARCHER] == "slow"
    assert WorkloadEnv.for_generator({"ASYNCRLHF_NATS_URL": NATS}).searcher == ""


# --- plan: one Deployment per group -----------------------------------------------------------


def _deployments(j: api.AsyncRLHFJob, **kw) -> dict[str, dict]:
    return {c["metadata"]["name"]: c for c in plan.desired_children(j, OWNER, NATS, **kw) if c["kind"] == "Deployment"}


def _env(d: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}


TWO_GROUPS = {"generator": {"replicas": 4, "searchers": [{"name": "fast", "replicas": 1, "syncEvery": 1},
                                                          {"name": "slow", "replicas": 2, "syncEvery": 4}]},
              "async": {"maxStaleness": 3}}


def test_plan_two_searchers_one_deployment_each():
    deps = _deployments(job(**TWO_GROUPS))
    assert {n: d["spec"]["replicas"] for n, d in deps.items()} == {
        "demo-generator": 1, "demo-generator-fast": 1, "demo-generator-slow": 2}
    assert SEARCHER not in _env(deps["demo-generator"])
    assert _env(deps["demo-generator-fast"])[SEARCHER] == "fast"
    assert _env(deps["demo-generator-slow"])[SEARCHER] == "slow"
    for name, group in (("demo-generator-fast", "fast"), ("demo-generator-slow", "slow")):
        d = deps[name]
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector[plan.SEARCHER_LABEL] == group
        assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        assert d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "generator"
    selectors = [frozenset(d["spec"]["selector"]["matchLabels"].items()) for d in deps.values()]
    assert len(set(selectors)) == 3
    # the same pod otherwise: the group is the only difference
    fast, slow = deps["demo-generator-fast"], deps["demo-generator-slow"]
    assert fast["spec"]["template"]["spec"]["containers"][0]["args"] == \
        slow["spec"]["template"]["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("kw,fields,counts", [
    ({"finished": True}, {}, [0, 0, 0]),
    ({}, {"suspend": True}, [0, 0, 0]),
    ({"admission": plan.Gate(True, True, generators=2)}, {}, [1, 1, 0]),  # Kueue's count, default group first
    ({"admission": plan.Gate(True, True, generators=3)}, {}, [1, 1, 1]),
])
def test_plan_groups_scale_down_together(kw, fields, counts):
    deps = _deployments(job(**TWO_GROUPS, **fields), **kw)
    assert [deps[n]["spec"]["replicas"] for n in ("demo-generator", "demo-generator-fast", "demo-generator-slow")] \
        == counts


def test_plan_without_searchers_is_unchanged():
    deps = _deployments(job(generator={"replicas": 3}))
    assert list(deps) == ["demo-generator"] and deps["demo-generator"]["spec"]["replicas"] == 3
    assert plan.group_replicas(job(generator={"replicas": 3})) == [3]


def test_local_run_gives_each_generator_its_group():
    from asyncrlhf.workload_env import searcher_env

    g = spec(**TWO_GROUPS).generator  # replicas 4: default 1, fast 1, slow 2
    assert [searcher_env(g, i) for i in range(5)] == [{}, {SEARCHER: "fast"}, {SEARCHER: "slow"},
                                                      {SEARCHER: "slow"}, {}]


def test_local_pool_passes_the_group_to_the_generator_process(tmp_path):
    from asyncrlhf.local_generators import GeneratorPool
    from asyncrlhf.workload_env import searcher_env

    started = []

    def launcher(role, index, attempt, config, run_dir, env, cores):
        started.append(env.get(SEARCHER, ""))
        raise StopIteration  # nothing is started

    class Ports:
        def env(self, role, index):
            return {}

    g = spec(**TWO_GROUPS).generator
    pool = GeneratorPool(tmp_path / "job.yaml", tmp_path, lambda extra: dict(extra), [[0]], [], Ports(),
                         env_for=lambda i: searcher_env(g, i), launcher=launcher)
    for i in range(4):
        with pytest.raises(StopIteration):
            pool.start(i)
    assert started == ["", "fast", "slow", "slow"]


# --- a real run: asyncrlhf run with a searcher and S > K ---------------------------------------

E2E = """
apiVersion: asyncrlhf.dev/v1alpha1
kind: AsyncRLHFJob
metadata: {name: tba-e2e}
spec:
  model: {policy: "builtin:tiny-sort"}
  task:
    prompts: {source: builtin, name: sort-digits}
    reward: {kind: rule, rule: sort-digits, noEosPenalty: -1.0}
  algorithm: {loss: tb, beta: 0.1, samplesPerPrompt: 4}
  async: {mode: async, maxStaleness: 6, replayBuffer: {generateSamples: 12, sampling: reward, temperature: 0.1}}
  generator:
    replicas: 2
    searchers: [{name: slow, replicas: 1, syncEvery: 3}]
    engine: hf
    sampling: {temperature: 0.7, maxTokens: 8}
  learner: {promptsPerStep: 8, totalSteps: 6, optimizer: {lr: 0.0003}}
  weightSync: {everySteps: 1, keepSnapshots: 8}
"""


@pytest.mark.slow
def test_a_local_run_with_a_searcher_generates_s_and_trains_on_k(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "job.yaml").write_text(E2E)
    done = subprocess.run([sys.executable, "-m", "asyncrlhf.cli", "run", str(tmp_path / "job.yaml"), "--quiet",
                           "--runs-dir", str(tmp_path / "runs")], cwd=Path(__file__).resolve().parents[1],
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "tba-e2e"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "samples" in r]
    assert len(steps) == 6
    assert all(r["samples"] == 8 * 12 for r in steps)  # S = 12 generated per prompt reach the learner
    assert all(r["replay_items"] >= 8 * 4 for r in steps)  # ... go into the buffer; K = 4 are trained on
    logs = {p.name: p.read_text() for p in run.glob("generator-*.log")}
    searcher = [n for n, text in logs.items() if "is a searcher of group slow" in text]
    assert searcher == ["generator-1.log"]  # index 1: the default group (1 generator) comes first


def test_dry_run_shows_each_generators_group(tmp_path):
    from asyncrlhf.local import dry_run

    text = "\n".join(dry_run(job(**TWO_GROUPS), tmp_path))
    blocks = {b.split(":")[0]: b for b in text.split("\ngenerator-")[1:]}
    assert f"{SEARCHER}=" not in blocks["0"]
    assert f"{SEARCHER}=fast" in blocks["1"]
    assert f"{SEARCHER}=slow" in blocks["2"] and f"{SEARCHER}=slow" in blocks["3"]


def test_searcher_deployments_validate_strictly():
    import kubernetes_validate

    for d in _deployments(job(**TWO_GROUPS)).values():
        kubernetes_validate.validate(d, "1.35", strict=True)


# --- operator: the searchers' Deployments in the status and the finalizer ---------------------


class FakeKube:
    """The calls the two functions make, answered from a dict of Deployments by name."""

    def __init__(self, deployments: dict[str, dict]) -> None:
        self.deployments, self.patched, self.deleted = deployments, [], []

    async def get(self, api_version, kind, namespace, name):
        return self.deployments.get(name)

    async def merge_patch(self, api_version, kind, namespace, name, patch):
        from asyncrlhf_operator.kube import KubeError

        if name not in self.deployments:
            raise KubeError(404, "NotFound", f"{name} not found")
        self.patched.append((name, patch))

    async def delete(self, api_version, kind, namespace, name, propagation="Background"):
        self.deleted.append(name)
        return True

    async def list(self, api_version, kind, namespace, labels):
        return []


def test_status_counts_the_searchers_ready_generators():
    import asyncio

    from asyncrlhf_operator.children import generators_status

    kube = FakeKube({"demo-generator-fast": {"status": {"readyReplicas": 1}},
                     "demo-generator-slow": {"status": {}}})  # not ready yet: no readyReplicas
    main = {"status": {"readyReplicas": 1, "replicas": 1}}
    status = asyncio.run(generators_status(kube, OWNER, job(**TWO_GROUPS), main))
    assert status["readyReplicas"] == 2 and status["replicas"] == 1 and main["status"]["readyReplicas"] == 1
    assert asyncio.run(generators_status(kube, OWNER, job(generator={"replicas": 3}), None)) == {}


def test_the_finalizer_scales_every_group_to_zero():
    import asyncio
    from types import SimpleNamespace

    from asyncrlhf_operator.children import stop_workloads

    kube = FakeKube({"demo-generator": {}, "demo-generator-fast": {}})  # slow's Deployment is gone already
    remaining = asyncio.run(stop_workloads(SimpleNamespace(kube=kube), OWNER, ("fast", "slow")))
    assert remaining == 0 and kube.deleted == ["demo-learner"]
    assert kube.patched == [("demo-generator", {"spec": {"replicas": 0}}),
                            ("demo-generator-fast", {"spec": {"replicas": 0}})]


def test_a_searcher_dropped_from_the_spec_loses_its_deployment():
    import asyncio

    from asyncrlhf_operator.children import remove_searchers

    def body(*names: str) -> dict:
        return {"spec": {"generator": {"replicas": 4, "searchers": [{"name": n, "replicas": 1} for n in names]}}}

    kube = FakeKube({})
    assert asyncio.run(remove_searchers(kube, OWNER, body("fast", "slow", "old"), body("fast", "slower"))) == [
        "old", "slow"]
    assert kube.deleted == ["demo-generator-old", "demo-generator-slow"]  # kept: the default group and "fast"
    kube.deleted.clear()
    assert asyncio.run(remove_searchers(kube, OWNER, body("fast"), body("fast"))) == [] and not kube.deleted
    assert asyncio.run(remove_searchers(kube, OWNER, None, body())) == []  # a body without searchers
