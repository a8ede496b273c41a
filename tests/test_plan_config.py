"""The rendered config (what the pods read) must be a job the workloads accept, run-time fields left out."""

from __future__ import annotations

import pytest
import yaml

from asyncrlhf import api
from asyncrlhf_operator import plan

OWNER = plan.Owner(name="demo", namespace="team", uid="0b8c4a4e-6b9e-4c55-9d5e-1f0c3a9b7d21")

GENERATORS = [
    ("searchers", {"replicas": 4, "searchers": [{"name": "s1", "replicas": 2, "syncEvery": 2}]}, 2),
    ("autoscale", {"replicas": 3, "autoscale": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}, 2),
    ("plain", {"replicas": 5}, None),
]


@pytest.mark.parametrize("case,generator,rendered", GENERATORS, ids=[g[0] for g in GENERATORS])
def test_the_rendered_config_is_a_valid_job_and_scaling_does_not_change_it(case, generator, rendered):
    def job(**gen) -> api.AsyncRLHFJob:
        return api.AsyncRLHFJob.model_validate({
            "metadata": {"name": OWNER.name, "namespace": OWNER.namespace},
            "spec": {"model": {"policy": "builtin:tiny-sort"}, "async": {"maxStaleness": 4}, "generator": gen}})

    j = job(**generator)
    data = yaml.safe_load(plan.config_map(j, OWNER)["data"]["job.yaml"])
    assert data["spec"]["generator"].get("replicas") == rendered
    api.AsyncRLHFJob.model_validate(data)  # what `asyncrlhf learner/generator --config` loads
    assert plan.config_hash(job(**(generator | {"replicas": 4}))) == plan.config_hash(j)
