"""What the workloads read on a cluster reaches their pods: reward credentials and code, tracker
credentials, the reward servers' ports; generators cannot write the snapshot volume."""

from __future__ import annotations

from typing import Any

from asyncrlhf import api
from asyncrlhf_operator import plan

OWNER = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")
NATS = "nats://nats.asyncrlhf:4222"


def job(**spec: Any) -> api.AsyncRLHFJob:
    return api.AsyncRLHFJob.model_validate({
        "apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "demo", "namespace": "team"},
        "spec": {"model": {"policy": "builtin:tiny-sort"}, **spec}})


def container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def test_http_reward_credentials_and_ports_reach_the_generators():
    reward = {"kind": "sum", "terms": [
        {"kind": "http", "http": {"url": "https://rm.team.svc/score", "auth": {
            "env": "RM_TOKEN", "secret": {"name": "rm-secret", "key": "token"}}}},
        {"kind": "http", "http": {"url": "http://judge:8080/v1"}},
        {"kind": "rule"},
    ]}
    j = job(task={"reward": reward})
    env = container(plan.generator_deployment(j, OWNER, NATS))["env"]
    assert {"name": "RM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "rm-secret", "key": "token"}}} in env
    assert not any(e["name"] == "RM_TOKEN" for e in container(plan.learner_job(j, OWNER, NATS))["env"])
    egress = plan.network_policy(j, OWNER, NATS)["spec"]["egress"]
    assert {"ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8080}]} in egress


def test_python_reward_code_is_mounted_where_python_rewards_import_from():
    j = job(task={"reward": {"kind": "python", "function": "my_rewards:score", "codeConfigMap": "reward-code"}})
    pod = plan.generator_deployment(j, OWNER, NATS)["spec"]["template"]["spec"]
    assert {"name": "reward-code", "configMap": {"name": "reward-code"}} in pod["volumes"]
    assert {"name": "reward-code", "mountPath": api.REWARD_CODE_DIR, "readOnly": True} in container(
        plan.generator_deployment(j, OWNER, NATS))["volumeMounts"]
    plain = plan.generator_deployment(job(), OWNER, NATS)["spec"]["template"]["spec"]
    assert not any(v["name"] == "reward-code" for v in plain["volumes"])


def test_tracker_credentials_reach_the_learner_only():
    j = job(tracking={"backends": ["wandb"], "credentialsSecret": "wandb-key"})
    assert container(plan.learner_job(j, OWNER, NATS))["envFrom"] == [{"secretRef": {"name": "wandb-key"}}]
    assert "envFrom" not in container(plan.generator_deployment(j, OWNER, NATS))
    assert "envFrom" not in container(plan.learner_job(job(), OWNER, NATS))


def test_generators_mount_the_snapshots_read_only_and_the_learner_read_write():
    def snapshots(obj: dict) -> dict:
        return next(m for m in container(obj)["volumeMounts"] if m["name"] == "snapshots")

    assert snapshots(plan.generator_deployment(job(), OWNER, NATS)).get("readOnly") is True
    assert not snapshots(plan.learner_job(job(), OWNER, NATS)).get("readOnly")


def test_the_metrics_port_is_open_to_scrapes_and_only_it():
    ingress = plan.network_policy(job(), OWNER, NATS)["spec"]["ingress"]
    port = api.JobSpec.model_validate({"model": {"policy": "builtin:tiny-sort"}}).metrics.port
    assert {"ports": [{"protocol": "TCP", "port": port}]} in ingress
    off = plan.network_policy(job(metrics={"port": 0}), OWNER, NATS)["spec"]["ingress"]
    assert all("from" in rule for rule in off)  # only the job's learners, on any port
