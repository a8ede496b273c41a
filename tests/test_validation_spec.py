"""Manifest validation: every value bounded and finite, names and paths checked by pattern, the
required policy, every problem at once — refused the same way by pydantic and by the generated CRD."""

from __future__ import annotations

import copy
import math
from typing import Any

import celpy
import jsonschema
import pytest

from asyncrlhf import api, messages
from asyncrlhf.manifest import ManifestError, parse_manifest
from asyncrlhf.spec.rules import MAX_GROUP_TOKENS
from asyncrlhf_operator import crd

POLICY = {"policy": "builtin:tiny-sort"}


def manifest(namespace: str = "default", **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", dict(POLICY))
    return {"apiVersion": api.API_VERSION, "kind": api.KIND,
            "metadata": {"name": "job", "namespace": namespace}, "spec": spec}


def problems(data: dict[str, Any]) -> list[str]:
    try:
        parse_manifest(data)
    except ManifestError as err:
        return err.problems
    return []


def crd_errors(data: dict[str, Any]) -> list[str]:
    """Where the CRD's OpenAPI schema refuses the manifest (what the apiserver checks first)."""
    schema = crd.spec_schema()
    return [".".join(map(str, e.absolute_path)) for e in jsonschema.Draft4Validator(schema).iter_errors(data)]


ONE_MIB = "x" * (1 << 20)

# (case, spec, field path, words in the problem, whether the CRD schema can see it: NaN and a
# namespace never reach it — JSON has no NaN, and the apiserver validates namespaces itself)
BAD = [
    ("lr .inf", {"learner": {"optimizer": {"lr": math.inf}}}, "spec.learner.optimizer.lr", "finite", True),
    ("lr 10", {"learner": {"optimizer": {"lr": 10}}}, "spec.learner.optimizer.lr", "less than or equal to 1", True),
    ("ackWait 1e-9", {"nats": {"ackWaitSeconds": 1e-9}}, "spec.nats.ackWaitSeconds", "greater than or equal to 1",
     True),
    ("ackWait .inf", {"nats": {"ackWaitSeconds": math.inf}}, "spec.nats.ackWaitSeconds", "finite", True),
    ("noEosPenalty .nan", {"task": {"reward": {"noEosPenalty": math.nan}}}, "spec.task.reward.noEosPenalty",
     "finite", False),
    ("maxBytes 1e30", {"nats": {"maxBytes": 1e30}}, "spec.nats.maxBytes", "far too large", True),
    ("maxBytes 2^51", {"nats": {"maxBytes": 1 << 51}}, "spec.nats.maxBytes", "less than or equal to", True),
    ("totalSteps 10^12", {"learner": {"totalSteps": 10 ** 12}}, "spec.learner.totalSteps", "less than", True),
    ("seed 2^40", {"learner": {"seed": 1 << 40}}, "spec.learner.seed", "less than", True),
    ("cpu lots", {"learner": {"resources": {"cpu": "lots"}}}, "spec.learner.resources.cpu", "", True),
    ("size huge", {"weightSync": {"size": "huge"}}, "spec.weightSync.size", "", True),
    ("1 MiB image", {"image": ONE_MIB}, "spec.image", "at most 512 characters", True),
    ("image with a space", {"image": "ghcr.io/a b:1"}, "spec.image", "image reference", True),
    ("1 MiB rule name", {"task": {"reward": {"rule": ONE_MIB}}}, "spec.task.reward.rule", "at most 4096", True),
    ("policy ../../etc/shadow", {"model": {"policy": "../../etc/shadow"}}, "spec.model.policy", "'..'", True),
    ("tokenizer /a/./b", {"model": {**POLICY, "tokenizer": "/a/./b"}}, "spec.model.tokenizer", "'..'", True),
    ("prompts /etc/shadow", {"task": {"prompts": {"source": "file", "path": "/etc/shadow"}}},
     "spec.task.prompts.path", ".jsonl", True),
    ("prompts ../p.jsonl", {"task": {"prompts": {"source": "file", "path": "../p.jsonl"}}},
     "spec.task.prompts.path", "'..'", True),
    ("service account token as prompts",
     {"task": {"prompts": {"source": "file", "path": "/var/run/secrets/kubernetes.io/serviceaccount/token"}}},
     "spec.task.prompts.path", ".jsonl", True),
    ("password in the NATS URL", {"nats": {"url": "nats://op:secret@evil:4222"}}, "spec.nats.url",
     "credentialsSecret", True),
    ("NATS URL wildcard", {"nats": {"url": ">"}}, "spec.nats.url", "nats://", True),
    ("Secret name with '_'", {"nats": {"credentialsSecret": "my_secret"}}, "spec.nats.credentialsSecret",
     "Kubernetes object name", True),
    ("PVC name upper-case", {"weightSync": {"volumeClaim": "Data"}}, "spec.weightSync.volumeClaim",
     "Kubernetes object name", True),
]


@pytest.mark.parametrize("case,spec,path,words,in_crd", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_refused_by_pydantic_and_the_crd(case, spec, path, words, in_crd):
    data = manifest(**spec)
    found = [p for p in problems(data) if p.startswith(path + ":")]
    assert found and words in found[0], problems(data)
    assert len(found[0]) < 600  # a 1 MiB value is shown cut short, not echoed whole
    if in_crd:
        assert path.removeprefix("spec.") in {e.removeprefix("spec.") for e in crd_errors(data)}, crd_errors(data)


@pytest.mark.parametrize("namespace,words", [(">", "DNS-1123 label"), ("*", "DNS-1123 label"),
                                             ("team.a", "DNS-1123 label"), ("Team", "DNS-1123 label"),
                                             ("-a", "DNS-1123 label"), ("a" * 64, "at most 63"), ("", "DNS-1123")])
def test_a_namespace_must_be_a_dns_label(namespace, words):
    found = problems(manifest(namespace=namespace))
    assert any(p.startswith("metadata.namespace:") and words in p for p in found), found


GOOD = [
    {"model": {"policy": "Qwen/Qwen2.5-0.5B-Instruct", "tokenizer": "/models/qwen/"}},
    {"model": {"policy": "/mnt/models/.cache/llama"}},
    {"task": {"prompts": {"source": "file", "path": "/data/prompts.jsonl"}}},
    {"task": {"prompts": {"source": "file", "path": "prompts/train.parquet"}}},
    {"image": "localhost:5000/team/asyncrlhf:0.1.0-cpu@sha256:" + "a" * 64},
    {"nats": {"url": "nats://a:4333,tls://[::1]:4334", "credentialsSecret": "bus-creds.v1"}},
    {"learner": {"optimizer": {"lr": 1.0}, "resources": {"cpu": "500m", "memory": "1.5Gi"}}},
    {"algorithm": {"samplesPerPrompt": 20}, "generator": {"sampling": {"maxTokens": 1024}}},  # 20,480 tokens
]


@pytest.mark.parametrize("spec", GOOD)
def test_good_values_pass_both(spec):
    data = manifest(**spec)
    assert problems(data) == [] and crd_errors(data) == []


def test_a_manifest_must_name_its_policy():
    for data in (manifest(model={"dtype": "float32"}), {**manifest(), "spec": {}},
                 {k: v for k, v in manifest().items() if k != "spec"}):
        assert any(p.startswith("spec.model.policy: required") for p in problems(data)), problems(data)
    schema = crd.spec_schema()
    assert schema["required"] == ["spec"] and schema["properties"]["spec"]["required"] == ["model"]
    model = schema["properties"]["spec"]["properties"]["model"]
    assert model["required"] == ["policy"] and "default" not in model["properties"]["policy"]
    assert crd_errors({**manifest(), "spec": {"model": {}}}) == ["spec.model"]


def test_every_problem_is_reported_at_once_with_rules_checked_on_the_valid_fields():
    data = manifest(
        algorithm={"loss": "rloo", "samplesPerPrompt": 1, "beta": -1},   # beta wrong; K=1 breaks a rule
        learner={"totlSteps": 3, "offload": True},                      # typo; offload without deepspeed
        **{"async": {"maxStaleness": "one"}}, weightSync={"everySteps": 4},  # the staleness rule reads a wrong field
    )
    found = problems(data)
    assert sorted(p.split(":")[0] for p in found) == [
        "spec.algorithm.beta", "spec.algorithm.samplesPerPrompt", "spec.async.maxStaleness",
        "spec.learner.offload", "spec.learner.totlSteps"], found
    # the staleness rule is not reported: maxStaleness itself is wrong (its stand-in would mislead)
    assert [p for p in found if p.startswith("spec.async.maxStaleness")] == [
        "spec.async.maxStaleness: Input should be a valid integer, unable to parse string as an integer "
        "(got 'one')"]
    assert "spec.learner.totlSteps: unknown field (check spelling; fields are camelCase); did you mean totalSteps?" \
        in found


def test_a_rule_on_a_wrong_field_is_not_reported_twice_or_on_a_stand_in():
    # the loss is wrong: the rule "this loss compares completions" reads it, so K=1 is not reported
    found = problems(manifest(algorithm={"loss": "dpo", "samplesPerPrompt": 1}))
    assert [p.split(":")[0] for p in found] == ["spec.algorithm.loss"], found


def test_every_broken_rule_is_reported_when_the_fields_are_valid():
    found = problems(manifest(algorithm={"samplesPerPrompt": 1}, learner={"offload": True},
                              task={"prompts": {"source": "file"}}))
    assert sorted(p.split(":")[0] for p in found) == [
        "spec.algorithm.samplesPerPrompt", "spec.learner.offload", "spec.task.prompts.path"], found


@pytest.mark.parametrize("k,max_tokens,message_bytes,fits", [
    (40, 1024, None, True), (40, 1025, None, False), (2, MAX_GROUP_TOKENS // 2, None, True),
    (2, MAX_GROUP_TOKENS // 2 + 1, None, False), (256, 160, None, True), (256, 161, None, False),
    # the chart's NATS (8 MiB): (8 MiB - 64 KiB) // 24 = 346,794 tokens
    (16, 16384, 8 << 20, True), (64, 4096, 8 << 20, True), (11, 31526, 8 << 20, True), (11, 31527, 8 << 20, False),
    (16, 32768, 8 << 20, False), (16, 32768, 64 << 20, True),
])
def test_a_rollout_group_must_fit_in_one_bus_message(k, max_tokens, message_bytes, fits):
    assert MAX_GROUP_TOKENS == 40960  # (1 MiB - 64 KiB) / 24 bytes a token
    nats = {} if message_bytes is None else {"maxMessageBytes": message_bytes}
    data = manifest(algorithm={"loss": "ppo", "samplesPerPrompt": k}, generator={"sampling": {"maxTokens": max_tokens}},
                    nats=nats)
    found = [p for p in problems(data) if p.startswith("spec.generator.sampling.maxTokens:")]
    assert (found == []) == fits, found
    if not fits:
        assert "nats.maxMessageBytes" in found[0] and "lower maxTokens" in found[0]
    [rule] = [r for r in crd.spec_schema()["properties"]["spec"]["x-kubernetes-validations"]
              if r["fieldPath"] == ".generator.sampling.maxTokens" and "samplesPerPrompt" in r["rule"]]
    env = celpy.Environment()
    spec = {"algorithm": {"samplesPerPrompt": k}, "generator": {"sampling": {"maxTokens": max_tokens}},
            "nats": {"maxMessageBytes": message_bytes or 1 << 20}}  # the CRD's default, as admission fills it in
    assert bool(env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(spec)})) == fits


def _unbounded(node: dict[str, Any], path: str):
    kind = node.get("type")
    if kind in ("number", "integer") and ("minimum" not in node or "maximum" not in node):
        yield f"{path}: {kind} without minimum and maximum (add ge=/le= to the field)"
    if kind == "string" and "maxLength" not in node and "enum" not in node:
        yield f"{path}: string without maxLength"
    for name, child in node.get("properties", {}).items():
        yield from _unbounded(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _unbounded(node["additionalProperties"], f"{path}.*")
    if kind == "array" and isinstance(node.get("items"), dict):
        yield from _unbounded(node["items"], f"{path}[]")


def test_every_number_and_string_of_the_spec_is_bounded_in_the_crd():
    spec = copy.deepcopy(crd.spec_schema()["properties"]["spec"])
    for role in ("generator", "learner"):  # Kubernetes' own PodSpec schema, bounded by the apiserver
        spec["properties"][role]["properties"]["podTemplate"]["properties"].pop("spec", None)
    assert list(_unbounded(spec, "spec")) == []


def test_pattern_errors_say_what_is_expected_not_the_regular_expression():
    [found] = problems(manifest(model={"policy": "a b"}))
    assert found == ("spec.model.policy: must be a hub id (org/name), a path without '.' or '..' segments, "
                     "or builtin:<name> (got 'a b')")


def test_the_message_bounds_are_the_spec_bounds():
    fields = api.JobSpec.model_json_schema(by_alias=True)["$defs"]
    assert fields["LearnerSpec"]["properties"]["totalSteps"]["maximum"] == messages.MAX_STEPS
    assert fields["LearnerSpec"]["properties"]["promptsPerStep"]["maximum"] == messages.MAX_PROMPTS_PER_STEP
    assert fields["AlgorithmSpec"]["properties"]["samplesPerPrompt"]["maximum"] == messages.MAX_SAMPLES
    assert fields["SamplingSpec"]["properties"]["maxTokens"]["maximum"] == messages.MAX_TOKENS


def test_the_operator_names_the_first_field_of_a_broken_rule():
    from asyncrlhf_operator.validation import validate

    job, error = validate(manifest(learner={"offload": True}))
    assert job is None and error.startswith("spec.learner.offload: offload needs backend 'deepspeed'")
