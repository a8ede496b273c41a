"""Generate the AsyncRLHFJob CustomResourceDefinition from the pydantic models in `asyncrlhf.api`.

The models are the single source of truth; this module only translates their JSON Schema
(draft 2020-12, with `$defs`) into a Kubernetes *structural* OpenAPI v3 schema:

- every `$ref` is inlined (the apiserver does not resolve references);
- `Optional[X]` (`anyOf: [X, null]`) becomes plain `X`: a null is pruned, the field is unset;
- `additionalProperties: false` is dropped (beside `properties` it is not structural; the
  apiserver prunes unknown fields instead, and `kubectl --validate=strict` reports them);
- numeric `exclusiveMinimum: 0` becomes OpenAPI v3.0's `minimum: 0, exclusiveMinimum: true`;
- nested objects (and maps, and lists) whose model has a default get `default: {}` (`[]`), so
  the apiserver fills every default in (as pydantic does) and the CEL rules see complete objects.

Cross-field constraints come from `api.CROSS_FIELD_RULES` as `x-kubernetes-validations`.

`python -m asyncrlhf_operator.crd` (or `asyncrlhf crd --write`) rewrites crds/asyncrlhf.dev_asyncrlhfjobs.yaml;
`--check` fails when the committed file differs from a fresh generation.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from asyncrlhf import api

from . import podschema

FILENAME = f"{api.GROUP}_{api.PLURAL}.yaml"
HEADER = (
    "# Generated from workloads/asyncrlhf/api.py by `asyncrlhf crd` "
    "(python -m asyncrlhf_operator.crd). Do not edit.\n"
)
# Keywords copied as they are; everything else pydantic emits (title, const, ...) is dropped
# or translated below.
_KEPT = (
    "description", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "format",
)

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase",
     "description": "Pending, Running, Suspended, Succeeded or Failed."},
    {"name": "Mode", "type": "string", "jsonPath": ".spec.async.mode",
     "description": "async or sync (the on-policy baseline)."},
    {"name": "Step", "type": "string", "jsonPath": ".status.progress",
     "description": "Learner optimizer steps done / learner.totalSteps."},
    {"name": "Generators", "type": "string", "jsonPath": ".status.generators",
     "description": "Generator pods ready / desired."},
    {"name": "Version", "type": "integer", "jsonPath": ".status.policyVersion",
     "description": "Policy version: the latest snapshot published to the generators."},
    {"name": "Staleness", "type": "number", "jsonPath": ".status.stalenessMean",
     "description": "Mean policy-version lag of the rollouts used so far."},
    {"name": "Reward", "type": "number", "jsonPath": ".status.rewardMean",
     "description": "Mean reward of the rollouts used in the last step."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


# `kubectl scale arj/NAME --replicas=N`, HPA and KEDA scale the generators through this.
SCALE = {"specReplicasPath": ".spec.generator.replicas", "statusReplicasPath": ".status.replicas",
         "labelSelectorPath": ".status.selector"}
# A field whose model is `dict[str, Any]` marked with this gets a schema from Kubernetes' own types.
KUBERNETES_SCHEMA = "x-asyncrlhf-kubernetes"


def generate_crd() -> dict[str, Any]:
    """The CRD manifest as a dict, ready for YAML."""
    schema = api.AsyncRLHFJob.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    props = schema["properties"]
    spec = _convert(props["spec"], defs, fill_defaults=True)
    _require(spec, api.REQUIRED_FIELDS)
    spec["x-kubernetes-validations"] = [_cel_rule(rule) for rule in api.CROSS_FIELD_RULES]
    for path in api.IMMUTABLE_FIELDS:
        node = spec
        for part in path.split("."):
            node = node["properties"][part]
        # a transition rule: evaluated on updates only, the standard Kubernetes immutability rule
        node.setdefault("x-kubernetes-validations", []).append({
            "rule": "self == oldSelf", "message": f"spec.{path} {api.IMMUTABLE_MESSAGE}",
            "reason": "FieldValueForbidden",
        })
    status = _convert(props["status"], defs, fill_defaults=False)
    status["description"] = "Observed state, written by the operator."
    root = {
        "type": "object",
        "description": _doc(api.AsyncRLHFJob),
        "properties": {
            "apiVersion": {"type": "string", "description": "asyncrlhf.dev/v1alpha1"},
            "kind": {"type": "string", "description": "AsyncRLHFJob"},
            "metadata": _metadata_schema(defs),
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "asyncrlhf", "app.kubernetes.io/part-of": "asyncrlhf"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["asyncrlhf"],
            },
            "versions": [{
                "name": api.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}, "scale": dict(SCALE)},
                "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def render() -> str:
    """The CRD as the YAML text committed in crds/."""
    return HEADER + yaml.safe_dump(generate_crd(), sort_keys=False, allow_unicode=True, width=100)


def spec_schema(crd: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The openAPIV3Schema of the (given or generated) CRD."""
    crd = crd or generate_crd()
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _doc(model: type) -> str:
    return " ".join((model.__doc__ or "").split())


def _cel_rule(rule: api.CrossFieldRule) -> dict[str, str]:
    # fieldPath points `kubectl` users at the field to fix (Kubernetes >= 1.28; older ones ignore it).
    return {
        "rule": rule.cel,
        "message": rule.message,
        "fieldPath": "." + rule.path,
        "reason": "FieldValueInvalid",
    }


def _require(spec: dict[str, Any], paths: tuple[str, ...]) -> None:
    """Each path required, with no default on its way (a default would satisfy `required`)."""
    for path in paths:
        node = spec
        for part in path.split("."):
            required = node.setdefault("required", [])
            if part not in required:
                required.append(part)
            node = node["properties"][part]
            node.pop("default", None)


def _metadata_schema(defs: dict[str, Any]) -> dict[str, Any]:
    # Structural schemas may restrict only metadata.name (and generateName): the job name bounds
    # keep every child name (and the learner's DNS hostname) within Kubernetes' limits.
    name = defs["ObjectMeta"]["properties"]["name"]
    return {
        "type": "object",
        "properties": {
            "name": {k: name[k] for k in ("type", "maxLength", "pattern", "description") if k in name},
        },
    }


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline `$ref` / `allOf: [$ref]` / `anyOf: [X, null]`, keeping the outer keywords."""
    outer = {k: v for k, v in node.items() if k not in ("$ref", "allOf", "anyOf")}
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return {**_resolve(target, defs), **outer}
    if "allOf" in node and len(node["allOf"]) == 1:
        return {**_resolve(node["allOf"][0], defs), **outer}
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"unions other than Optional are not structural: {node}")
        return {**_resolve(variants[0], defs), **outer}
    return node


def _convert(node: dict[str, Any], defs: dict[str, Any], *, fill_defaults: bool) -> dict[str, Any]:
    node = _resolve(node, defs)
    if node.get(KUBERNETES_SCHEMA) == "PodSpec":
        out = {**podschema.schema(), "description": node.get("description", "")}
        return {**out, "default": {}} if fill_defaults else out
    out: dict[str, Any] = {"type": node["type"] if "type" in node else _type_of_enum(node)}
    for key in _KEPT:
        if key in node:
            out[key] = node[key]
    if "const" in node:
        out["enum"] = [node["const"]]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node[bound], bool):
            out[inclusive], out[bound] = node[bound], True
    if fill_defaults and node.get("default") is not None:
        out["default"] = node["default"]
    if out["type"] == "object":
        _convert_object(node, out, defs, fill_defaults=fill_defaults)
    elif out["type"] == "array":
        out["items"] = _convert(node["items"], defs, fill_defaults=fill_defaults)
        if "type" in out["items"].get("required", ()):
            # Conditions: a map keyed by type, so server-side apply merges them per type.
            out["x-kubernetes-list-type"] = "map"
            out["x-kubernetes-list-map-keys"] = ["type"]
    return out


def _convert_object(node, out, defs, *, fill_defaults: bool) -> None:
    if "properties" in node:
        out["properties"] = {}
        for name, child in node["properties"].items():
            converted = _convert(child, defs, fill_defaults=fill_defaults)
            if fill_defaults and name not in node.get("required", ()) and "default" not in converted:
                # pydantic's default_factory leaves no default in its schema: objects, maps and
                # lists start empty, as the models do
                if converted.get("type") == "object":
                    converted["default"] = {}
                elif converted.get("type") == "array":
                    converted["default"] = []
            out["properties"][name] = converted
        if node.get("required"):
            out["required"] = list(node["required"])
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(
            node["additionalProperties"], defs, fill_defaults=fill_defaults
        )


def _type_of_enum(node: dict[str, Any]) -> str:
    values = node.get("enum") or [node.get("const")]
    kinds = {type(v) for v in values}
    if kinds == {str}:
        return "string"
    raise ValueError(f"cannot type schema node without 'type': {node}")


def default_path() -> Path:
    """crds/<file> of the source checkout this module lives in."""
    return Path(__file__).resolve().parents[2] / "crds" / FILENAME


def chart_path() -> Path:
    """The Helm chart's copy, which must stay byte-identical to crds/."""
    return Path(__file__).resolve().parents[2] / "charts" / "asyncrlhf" / "files" / "crd.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `python -m asyncrlhf_operator.crd`, also those of `asyncrlhf crd`."""
    parser.add_argument(
        "-o", "--output", default=None,
        help=f"file to write ('-' = stdout; default: crds/{FILENAME} of the source checkout, "
        "or stdout when installed)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the CRD (or with --check, compare it) to --output, else crds/ and the chart's copy."""
    text = render()
    if args.output:
        targets = [args.output]
    elif default_path().parent.is_dir():  # a source checkout: crds/ and the chart's copy
        targets = [str(p) for p in (default_path(), chart_path()) if p.parent.is_dir()]
    else:
        targets = ["-"]
    if args.check:
        stale = [t for t in targets if (sys.stdin.read() if t == "-" else
                                        Path(t).read_text() if Path(t).exists() else "") != text]
        for t in stale:
            print(f"{t} is out of date: run `asyncrlhf crd --write` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for target in targets:
        if target == "-":
            sys.stdout.write(text)
        else:
            Path(target).write_text(text)
            print(f"wrote {target}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asyncrlhf crd", description="Generate the AsyncRLHFJob CRD from the pydantic models."
    )
    return run(add_arguments(parser).parse_args(argv))

if __name__ == "__main__":
    sys.exit(main())
