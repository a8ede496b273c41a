"""The learner Job across an operator upgrade: a Job's pod template is immutable, so when the
same config renders another template (a new operator), the apiserver refuses the apply (422,
"field is immutable") and the operator replaces the Job: the learner resumes from its checkpoint."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from asyncrlhf import api
from asyncrlhf_operator import children, plan
from asyncrlhf_operator.kube import KubeError

OWNER = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")
JOB = api.AsyncRLHFJob.model_validate({"metadata": {"name": "demo", "namespace": "team"},
                                       "spec": {"model": {"policy": "builtin:tiny-sort"}}})
IMMUTABLE = KubeError(422, "Invalid", 'Job.batch "demo-learner" is invalid: spec.template: Invalid value: '
                      'core.PodTemplateSpec{...}: field is immutable')


class FakeKube:
    def __init__(self, existing: dict, apply_error: Exception | None = None) -> None:
        self.existing, self.apply_error, self.applied, self.deleted = existing, apply_error, [], []

    async def get(self, api_version, kind, namespace, name):
        return self.existing

    async def apply(self, obj):
        self.applied.append(obj)
        if self.apply_error is not None:
            raise self.apply_error
        return obj

    async def delete(self, api_version, kind, namespace, name, propagation="Background"):
        self.deleted.append((kind, name, propagation))
        return True


def _reconcile(kube: FakeKube, monkeypatch) -> list[str]:
    events: list[str] = []
    monkeypatch.setattr(children.kopf, "info", lambda body, reason, message: events.append(f"{reason}: {message}"))
    desired = plan.learner_job(JOB, OWNER, "nats://nats:4222")
    asyncio.run(children.reconcile_learner(SimpleNamespace(kube=kube), {}, JOB, desired, finished=False))
    return events


def _existing(config_hash: str) -> dict:
    return {"metadata": {"name": "demo-learner"},
            "spec": {"template": {"metadata": {"annotations": {plan.CONFIG_HASH: config_hash}}}}}


def test_a_template_the_apiserver_refuses_as_immutable_replaces_the_job(monkeypatch):
    kube = FakeKube(_existing(plan.config_hash(JOB)), apply_error=IMMUTABLE)
    events = _reconcile(kube, monkeypatch)
    assert len(kube.applied) == 1 and kube.deleted == [("Job", "demo-learner", "Foreground")]
    assert events == ["LearnerReplaced: the operator's learner pod template changed (an operator upgrade): "
                      "restarting the learner from its checkpoint with it"]


def test_the_same_template_is_applied_and_a_changed_config_replaces_without_applying(monkeypatch):
    same = FakeKube(_existing(plan.config_hash(JOB)))
    assert _reconcile(same, monkeypatch) == [] and len(same.applied) == 1 and same.deleted == []
    changed = FakeKube(_existing("an older config"))
    assert _reconcile(changed, monkeypatch)[0].startswith("LearnerReplaced: the config changed")
    assert changed.applied == [] and changed.deleted == [("Job", "demo-learner", "Foreground")]


@pytest.mark.parametrize("error", [KubeError(422, "Invalid", "spec.parallelism: must be >= 0"),
                                   KubeError(500, "InternalError", "etcd timeout")])
def test_other_apply_errors_are_raised_not_taken_for_an_upgrade(monkeypatch, error):
    kube = FakeKube(_existing(plan.config_hash(JOB)), apply_error=error)
    with pytest.raises(KubeError):
        _reconcile(kube, monkeypatch)
    assert kube.deleted == []
