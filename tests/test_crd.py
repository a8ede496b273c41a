"""The generated CRD: up to date, structural, and in agreement with the pydantic models.

No apiserver runs here, so the apiserver's jobs are done by hand: a structural-schema walk,
defaulting (the schema's defaults must equal pydantic's), OpenAPI validation with jsonschema
(Draft 4 semantics, as OpenAPI v3.0), and the CEL rules evaluated with cel-python.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from asyncrlhf import api
from asyncrlhf_operator import crd

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.35"
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
# JSONSchemaProps fields we allow ourselves (a typo in the generator must not slip through).
ALLOWED_KEYS = {
    "type", "description", "properties", "required", "items", "additionalProperties", "enum",
    "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
    "maxLength", "pattern", "minItems", "maxItems", "format", "nullable",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
}


# ---------------------------------------------------------------------------------------------
# Helpers standing in for the apiserver


def structural_violations(node: Any, path: str = "") -> Iterator[str]:
    """What a real apiserver would refuse in a CRD schema (the structural-schema rules)."""
    if not isinstance(node, dict):
        yield f"{path}: not a schema object"
        return
    if node.get("x-kubernetes-int-or-string") is True:
        if "type" in node:
            yield f"{path}: x-kubernetes-int-or-string must not have a type"
    elif node.get("type") not in TYPES:
        yield f"{path or '<root>'}: no valid type ({node.get('type')!r})"
    if node.get("x-kubernetes-preserve-unknown-fields") is True and "properties" in node:
        yield f"{path}: preserve-unknown-fields beside properties (open only where Kubernetes is)"
    for key in sorted(set(node) - ALLOWED_KEYS):
        yield f"{path}: keyword {key!r} is not allowed (no $ref, allOf, anyOf, const, title...)"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}: properties and additionalProperties together"
    if isinstance(node.get("additionalProperties"), bool):
        yield f"{path}: additionalProperties must be a schema"
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            yield f"{path}: {bound} must be a boolean in OpenAPI v3.0"
    if "default" in node:
        errors = list(jsonschema.Draft4Validator(node).iter_errors(node["default"]))
        if errors:
            yield f"{path}: default {node['default']!r} is invalid: {errors[0].message}"
    if "x-kubernetes-list-map-keys" in node:
        for key in node["x-kubernetes-list-map-keys"]:
            if key not in node["items"].get("required", ()):
                yield f"{path}: list-map key {key!r} must be required"
    for name, child in node.get("properties", {}).items():
        yield from structural_violations(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_violations(node["additionalProperties"], f"{path}.*")
    if node.get("type") == "array":
        yield from structural_violations(node.get("items"), f"{path}[]")


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the apiserver does it (defaults are defaulted in turn)."""
    if schema.get("type") == "object" and isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for key in value:
                value[key] = apply_defaults(schema["additionalProperties"], value[key])
    elif schema.get("type") == "array" and isinstance(value, list):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """OpenAPI errors of a manifest against the CRD, after defaulting (as on admission)."""
    schema = crd.spec_schema()
    defaulted = apply_defaults(schema, copy.deepcopy(manifest))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(defaulted)
    ]


_CEL = celpy.Environment()


def _cel_sum(items: celpy.celtypes.ListType):
    """`list.sum()` of the Kubernetes CEL list library, which cel-python lacks: numbers only, and an
    empty list sums to the int 0, as in Kubernetes."""
    if not items:
        return celpy.celtypes.IntType(0)
    return type(items[0])(sum(items[1:], items[0]))  # the elements' CEL type (an int list sums to an int)


# the Kubernetes CEL library functions the CRD's rules use, emulated
KUBERNETES_FUNCTIONS = {"sum": _cel_sum}


def cel_program(rule: str):
    return _CEL.program(_CEL.compile(rule), functions=KUBERNETES_FUNCTIONS)


@pytest.mark.parametrize("expression,expected", [
    ("[1, 3].sum()", 4), ("[].sum()", 0), ("[1.5, 3.0].sum()", 4.5), ("[{'r': 2}, {'r': 5}].map(x, x.r).sum()", 7),
])
def test_the_emulated_list_sum_sums_as_kubernetes_does(expression, expected):
    result = cel_program(expression).evaluate({})
    assert result == expected and type(result) is type(celpy.json_to_cel(expected))


def cel_failures(manifest: dict[str, Any]) -> list[str]:
    """fieldPaths of the spec's x-kubernetes-validations that fail (or error) on the manifest."""
    schema = crd.spec_schema()
    spec = apply_defaults(schema, copy.deepcopy(manifest)).get("spec", {})
    failed = []
    for rule in schema["properties"]["spec"]["x-kubernetes-validations"]:
        result = cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(spec)})
        if isinstance(result, celpy.CELEvalError) or not bool(result):
            failed.append(rule["fieldPath"])
    return failed


def pydantic_error(manifest: dict[str, Any]) -> str | None:
    try:
        api.AsyncRLHFJob.model_validate(manifest)
    except pydantic.ValidationError as err:
        return str(err)
    return None


def manifest(name: str = "demo", **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"policy": "builtin:tiny-sort"})  # required in a manifest (api.REQUIRED_FIELDS)
    return {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}


def example_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "examples").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == api.KIND:
                found.append((path.relative_to(ROOT).as_posix(), doc))
    return found


ALL_GOOD = [
    ("minimal", manifest("minimal")),
    ("defaults-filled", api.AsyncRLHFJob(metadata={"name": "defaults"}).to_manifest()),
] + example_manifests()


# ---------------------------------------------------------------------------------------------
# The CRD file and its shape


def test_committed_crd_is_fresh():
    committed = (ROOT / "crds" / crd.FILENAME).read_text()
    assert committed == crd.render(), "crds/ is stale: run `python -m asyncrlhf_operator.crd`"


def test_main_check_mode(tmp_path):
    target = tmp_path / "crd.yaml"
    assert crd.main(["-o", str(target)]) == 0
    assert crd.main(["-o", str(target), "--check"]) == 0
    target.write_text(target.read_text() + "# edited\n")
    assert crd.main(["-o", str(target), "--check"]) == 1


def test_crd_is_a_valid_kubernetes_object():
    kubernetes_validate.validate(crd.generate_crd(), K8S_VERSION, strict=True)


def test_names_and_subresources():
    spec = crd.generate_crd()["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "asyncrlhf.dev", "AsyncRLHFJob", "asyncrlhfjobs")
    assert spec["names"]["shortNames"] == ["arj"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.generator.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase", "Mode": ".spec.async.mode", "Step": ".status.progress",
        "Generators": ".status.generators", "Version": ".status.policyVersion",
        "Staleness": ".status.stalenessMean", "Reward": ".status.rewardMean", "Age": ".metadata.creationTimestamp",
    }


def test_the_scale_subresource_points_at_schema_fields_of_the_right_types():
    schema = crd.spec_schema()
    expected = {"specReplicasPath": "integer", "statusReplicasPath": "integer", "labelSelectorPath": "string"}
    for key, kind in expected.items():
        node = schema
        for part in crd.SCALE[key].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == kind, key


def test_schema_is_structural():
    assert list(structural_violations(crd.spec_schema())) == []


def test_metadata_restricts_only_the_name():
    metadata = crd.spec_schema()["properties"]["metadata"]
    assert set(metadata) == {"type", "properties"} and set(metadata["properties"]) == {"name"}


def test_printer_columns_point_at_schema_fields():
    schema = crd.spec_schema()
    for column in crd.generate_crd()["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"], column


def test_every_spec_field_is_documented():
    from asyncrlhf_operator import podschema

    def undocumented(node, path):
        # Kubernetes' own types are described down to podschema.DESCRIBED_DEPTH (the CRD's size)
        kubernetes_part = path.partition(".podTemplate.spec.")[2]
        if "description" not in node and kubernetes_part.count(".") < podschema.DESCRIBED_DEPTH:
            yield path
        for name, child in node.get("properties", {}).items():
            yield from undocumented(child, f"{path}.{name}")

    assert list(undocumented(crd.spec_schema()["properties"]["spec"], "spec")) == []


def test_cel_field_paths_exist():
    spec = crd.spec_schema()["properties"]["spec"]
    for rule in spec["x-kubernetes-validations"]:
        node = spec
        for part in rule["fieldPath"].strip(".").split("."):
            node = node["properties"][part]
        assert rule["message"] and "\n" not in rule["message"]


def test_crd_defaults_equal_pydantic_defaults():
    schema = crd.spec_schema()["properties"]["spec"]
    expected = api.JobSpec().model_dump(by_alias=True, exclude_none=True, mode="json")
    required = {"model": {"policy": api.JobSpec().model.policy}}  # no default in a manifest
    assert apply_defaults(schema, required) == expected


def test_status_schema_accepts_a_full_status():
    status = api.JobStatus(
        phase="Running", step=3, generator_versions={"g-0": 2}, reward_mean=0.5,
        conditions=[api.Condition(type="Ready", status="True", reason="AllReady",
                                  last_transition_time="2026-01-01T00:00:00Z")],
    ).model_dump(by_alias=True, exclude_none=True, mode="json")
    schema = crd.spec_schema()["properties"]["status"]
    assert list(jsonschema.Draft4Validator(schema).iter_errors(status)) == []


# ---------------------------------------------------------------------------------------------
# Manifests against the CRD and pydantic


@pytest.mark.parametrize("name,job", ALL_GOOD, ids=[n for n, _ in ALL_GOOD])
def test_good_manifest_passes_schema_cel_and_pydantic(name, job):
    assert schema_errors(job) == []
    assert cel_failures(job) == []
    assert pydantic_error(job) is None


def test_the_example_glob_finds_every_example():
    # Guards the glob: the table above covers every manifest in examples/, and there are some.
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").rglob("*.y*ml")}
    assert files, "no examples/*.yaml found"
    assert {n for n, _ in example_manifests()} == files


BAD_VALUES = [
    ("negative replicas", manifest(generator={"replicas": -1}), "spec.generator.replicas"),
    ("unknown loss", manifest(algorithm={"loss": "sft"}), "spec.algorithm.loss"),
    ("clip epsilon 1", manifest(algorithm={"clipEpsilon": 1.0}), "spec.algorithm.clipEpsilon"),
    ("zero beta", manifest(algorithm={"beta": 0}), "spec.algorithm.beta"),
    ("too many gpus", manifest(learner={"gpusPerNode": 17}), "spec.learner.gpusPerNode"),
    ("bad mode", manifest(**{"async": {"mode": "later"}}), "spec.async.mode"),
    ("string steps", manifest(learner={"totalSteps": "many"}), "spec.learner.totalSteps"),
    ("upper-case name", manifest("Demo"), "metadata.name"),
    ("long name", manifest("x" * 41), "metadata.name"),
    ("name starting with a digit", manifest("1abc"), "metadata.name"),  # Services need DNS-1035 labels
]


@pytest.mark.parametrize("case,job,field", BAD_VALUES, ids=[c for c, _, _ in BAD_VALUES])
def test_bad_value_rejected_by_schema_and_pydantic(case, job, field):
    errors = schema_errors(job)
    assert any(e.startswith(field) for e in errors), errors
    assert pydantic_error(job) is not None


CROSS_FIELD = [
    ("staleness below k-1", manifest(**{"async": {"maxStaleness": 1}}, weightSync={"everySteps": 4}),
     ".async.maxStaleness"),
    ("staleness k-1 is enough", manifest(**{"async": {"maxStaleness": 3}}, weightSync={"everySteps": 4}),
     None),
    ("sync with every 2", manifest(**{"async": {"mode": "sync"}}, weightSync={"everySteps": 2}),
     ".async.maxStaleness"),
    ("sync every step", manifest(**{"async": {"mode": "sync", "maxStaleness": 0}}), None),
    ("dpo with one sample", manifest(algorithm={"samplesPerPrompt": 1}), ".algorithm.samplesPerPrompt"),
    ("ppo with one sample", manifest(algorithm={"loss": "ppo", "samplesPerPrompt": 1}), None),
    ("file without path", manifest(task={"prompts": {"source": "file"}}), ".task.prompts.path"),
    ("file with path", manifest(task={"prompts": {"source": "file", "path": "/data/p.jsonl"}}), None),
    ("reward model unnamed", manifest(task={"reward": {"kind": "model"}}), ".task.reward.model"),
    ("offload on torch", manifest(learner={"offload": True}), ".learner.offload"),
    ("offload on deepspeed", manifest(learner={"offload": True, "backend": "deepspeed"}), None),
    # the TBA searchers (GeneratorSpec._check_searchers): unique names, carved out of replicas, no autoscale
    ("searcher names repeated", manifest(generator={"replicas": 4, "searchers": [{"name": "a"}, {"name": "a"}]}),
     ".generator.searchers"),
    ("searcher names distinct", manifest(generator={"replicas": 4, "searchers": [
        {"name": "a"}, {"name": "b"}, {"name": "c", "replicas": 2}]}), None),
    ("searchers beyond replicas", manifest(generator={"replicas": 3, "searchers": [
        {"name": "a", "replicas": 2}, {"name": "b", "replicas": 2}]}), ".generator.searchers"),
    ("searchers are all the replicas", manifest(generator={"replicas": 4, "searchers": [
        {"name": "a", "replicas": 2}, {"name": "b", "replicas": 2}]}), None),
    ("searchers with autoscale", manifest(generator={"searchers": [{"name": "a"}], "autoscale": {"enabled": True}}),
     ".generator.searchers"),
    ("autoscale without searchers", manifest(generator={"autoscale": {"enabled": True}}), None),
]


@pytest.mark.parametrize("case,job,field", CROSS_FIELD, ids=[c for c, _, _ in CROSS_FIELD])
def test_cel_rules_agree_with_pydantic(case, job, field):
    assert schema_errors(job) == []
    assert cel_failures(job) == ([field] if field else [])
    error = pydantic_error(job)
    assert (error is None) == (field is None), error


# ---------------------------------------------------------------------------------------------
# Immutable fields: CEL transition rules (the apiserver) and the operator's own check


def _node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema["properties"]["spec"]
    for part in path.split("."):
        node = node["properties"][part]
    return node


@pytest.mark.parametrize("path,old,new", [
    ("model.policy", "a", "b"),
    ("model.dtype", "float32", "bfloat16"),
    ("learner.promptsPerStep", 16, 32),
])
def test_immutable_fields_have_a_transition_rule_that_rejects_a_change(path, old, new):
    rules = _node(crd.spec_schema(), path)["x-kubernetes-validations"]
    [rule] = [r for r in rules if "oldSelf" in r["rule"]]
    assert rule["message"].startswith(f"spec.{path} is immutable")
    program = cel_program(rule["rule"])

    def passes(before, after) -> bool:
        return bool(program.evaluate({"self": celpy.json_to_cel(after), "oldSelf": celpy.json_to_cel(before)}))

    assert passes(old, copy.deepcopy(old)) and not passes(old, new)


def test_the_operator_refuses_a_changed_immutable_field_and_accepts_it_set_back():
    from asyncrlhf_operator.validation import IMMUTABLE_ANNOTATION, recorded_immutables, validate

    original = manifest("imm", model={"policy": "org/policy-1b"}, learner={"promptsPerStep": 8})
    job, error = validate(original)
    assert error == ""
    recorded = {**original, "metadata": {**original["metadata"],
                                         "annotations": {IMMUTABLE_ANNOTATION: recorded_immutables(job)}}}
    assert validate(recorded)[1] == ""

    changed = copy.deepcopy(recorded)
    changed["spec"]["model"]["policy"] = "org/policy-8b"
    job, error = validate(changed)
    assert job is None and error.startswith("spec.model.policy: is immutable") and "org/policy-1b" in error
    changed["spec"]["model"]["policy"] = "org/policy-1b"
    changed["spec"]["learner"]["promptsPerStep"] = 16
    assert validate(changed)[1].startswith("spec.learner.promptsPerStep: is immutable")
    changed["spec"]["learner"]["promptsPerStep"] = 8
    changed["spec"]["learner"]["totalSteps"] = 5000  # other fields may change
    assert validate(changed)[1] == ""


# ---------------------------------------------------------------------------------------------
# podTemplate: a schema from the Kubernetes OpenAPI types


def test_the_pod_spec_schema_is_fresh_from_the_kubernetes_types():
    from asyncrlhf_operator import podschema

    assert podschema.main(["--check"]) == 0, "run `python -m asyncrlhf_operator.podschema`"


POD_TEMPLATES = [
    ("good", {"spec": {"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "a", "operator": "Exists"}],
                       "containers": [{"name": "generator", "resources": {"limits": {"rdma/hca": 1}},
                                       "envFrom": [{"secretRef": {"name": "s"}}]}]}}, None),
    ("bad quantity", {"spec": {"containers": [{"name": "generator", "resources": {"limits": {"x/y": "4 GB"}}}]}},
     "resources.limits.x/y"),
    ("wrong type", {"spec": {"nodeSelector": ["pool"]}}, "nodeSelector"),
    ("container without a name", {"spec": {"containers": [{"env": []}]}}, "containers.0"),
]


@pytest.mark.parametrize("case,template,error_at", POD_TEMPLATES, ids=[p[0] for p in POD_TEMPLATES])
def test_the_crd_checks_pod_templates_with_kubernetes_types(case, template, error_at):
    errors = schema_errors(manifest(generator={"podTemplate": template}))
    if error_at is None:
        assert errors == []
    else:
        assert any(error_at in e for e in errors), errors


def test_pod_template_schema_has_no_open_object_but_kubernetes_own():
    def open_nodes(node, path):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            yield path
        for name, child in node.get("properties", {}).items():
            yield from open_nodes(child, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from open_nodes(node[key], f"{path}[]")

    spec = crd.spec_schema()["properties"]["spec"]["properties"]["generator"]["properties"]["podTemplate"]
    assert {p.rsplit(".", 1)[-1] for p in open_nodes(spec, "podTemplate")} == {"metadata"}  # ephemeral volume claim
