"""Manifests: defaults, camelCase, and errors that name the field and say why (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncrlhf.api import AsyncRLHFJob
from asyncrlhf.manifest import ManifestError, dump_manifest, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[1]


def manifest(**spec) -> dict:
    spec.setdefault("model", {"policy": "builtin:tiny-sort"})  # a manifest must name its policy
    return {"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "t"}, "spec": spec}


def test_defaults_fill_in_and_round_trip_in_camel_case():
    job = parse_manifest(manifest())
    data = job.to_manifest()
    assert data["spec"]["async"]["maxStaleness"] == 1
    assert data["spec"]["weightSync"]["everySteps"] == 1
    assert data["spec"]["generator"]["kvCacheGiB"] == 0.5
    assert AsyncRLHFJob.model_validate(yaml.safe_load(dump_manifest(job))) == job


@pytest.mark.parametrize("spec, path, words", [
    ({"algorithm": {"loss": "dpo"}}, "spec.algorithm.loss", "online-dpo"),
    ({"algorithm": {"samplesPerPrompt": 0}}, "spec.algorithm.samplesPerPrompt", "greater than or equal to 1"),
    ({"learner": {"totlSteps": 3}}, "spec.learner.totlSteps", "unknown field"),
    ({"async": {"maxStaleness": 0}, "weightSync": {"everySteps": 3}}, "spec.async.maxStaleness", "everySteps - 1"),
    ({"async": {"mode": "sync"}, "weightSync": {"everySteps": 2}}, "spec.async.maxStaleness", "sync mode"),
    ({"algorithm": {"loss": "online-dpo", "samplesPerPrompt": 1}}, "spec.algorithm.samplesPerPrompt", "2 or more"),
    ({"task": {"prompts": {"source": "file"}}}, "spec.task.prompts.path", "JSONL"),
    ({"generator": {"sampling": {"temperature": 0}}}, "spec.generator.sampling.temperature", "greater than 0"),
])
def test_errors_name_the_field_and_why(spec, path, words):
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest(**spec))
    problems = err.value.problems
    assert any(p.startswith(path + ":") and words in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest(algorithm={"loss": "x", "beta": -1}, learner={"totalSteps": 0}))
    assert len(err.value.problems) == 3


def test_a_manifest_without_a_spec_does_not_start_the_toy_job(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("apiVersion: asyncrlhf.dev/v1alpha1\nkind: AsyncRLHFJob\nmetadata: {name: bare}\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(bare)
    assert [p.split(":")[0] for p in err.value.problems] == ["spec.model.policy"]
    assert load_manifest(ROOT / "examples" / "local-tiny.yaml").spec.model.policy == "builtin:tiny-sort"


def test_wrong_kind_and_bad_yaml(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("kind: Deployment\n")
    with pytest.raises(ManifestError, match="no document with kind: AsyncRLHFJob"):
        load_manifest(f)
    f.write_text("kind: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(f)


def test_cli_exit_code_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest(algorithm={"loss": "dpo"}, learner={"totlSteps": 3})))
    proc = subprocess.run([sys.executable, "-m", "asyncrlhf.cli", "run", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "spec.algorithm.loss" in proc.stderr and "spec.learner.totlSteps: unknown field" in proc.stderr


def test_examples_are_valid():
    paths = sorted((ROOT / "examples").glob("*.yaml"))
    assert paths, "no examples/*.yaml found"
    for path in paths:
        load_manifest(path)


@pytest.mark.parametrize("role, variable", [("generator", "ASYNCRLHF_NATS_URL"),
                                            ("learner", "ASYNCRLHF_SNAPSHOT_DIR")])
def test_a_workload_without_its_environment_exits_2_naming_the_variable(role, variable, tmp_path, monkeypatch,
                                                                         capsys):
    from asyncrlhf import cli

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(manifest()))
    for name in ("ASYNCRLHF_NATS_URL", "ASYNCRLHF_SNAPSHOT_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main([role, "--config", str(config)])
    assert exited.value.code == 2
    assert f"error: environment variable {variable} is not set" in capsys.readouterr().err
