"""`asyncrlhf export`: a snapshot becomes a Hugging Face directory that transformers loads and that
generates what the snapshot's weights generate; damaged or ambiguous inputs are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from asyncrlhf.api import JobSpec
from asyncrlhf.backends.weights import save_snapshot_files
from asyncrlhf.export import ExportError, export, find_snapshot, snapshot_tokenizer
from asyncrlhf.models import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from asyncrlhf.snapshots import load_snapshot_state, write_snapshot

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPTS = ["3 1 2 =", "9 0 9 5 =", "7 7 1 =", "4 2 8 6 1 ="]


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model("builtin:tiny-sort")


def trained(tiny: str, seed: int = 3):
    """The tiny policy moved far from its start, as if trained."""
    model = load_causal_lm(tiny)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def greedy(model, tokenizer) -> list[list[int]]:
    out = []
    for text in PROMPTS:
        ids = torch.tensor([encode_prompt(tokenizer, text)])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             eos_token_id=2, pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def run_layout(tmp_path: Path, tiny: str, spec: JobSpec, version: int = 4, tokenizer: bool = True) -> Path:
    """A run directory as `asyncrlhf run` leaves it: job.yaml and volume/snapshots/v<version>/."""
    run = tmp_path / "runs" / "job"
    run.mkdir(parents=True)
    manifest = {"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "job"},
                "spec": spec.model_dump(by_alias=True, mode="json")}
    (run / "job.yaml").write_text(yaml.safe_dump(manifest))
    model, tok = trained(tiny), snapshot_tokenizer(spec, tiny)

    def save(directory: Path):
        digests = save_snapshot_files(model, directory, "float32")
        if tokenizer:
            tok.save_pretrained(directory)
        return digests

    write_snapshot(run / "volume", version - 2, save)  # an older one: export picks the newest
    write_snapshot(run / "volume", version, save)
    return run


def test_export_loads_in_transformers_and_generates_the_snapshots_greedy_tokens(tmp_path, tiny):
    spec = JobSpec.model_validate({"model": {"chatTemplate": TEMPLATE}})
    run = run_layout(tmp_path, tiny, spec)
    snapshot = run / "volume" / "snapshots" / "v4"
    out = export(run, tmp_path / "out")

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= files
    assert "MANIFEST.json" not in files
    assert (out / "chat_template.jinja").read_text() == TEMPLATE  # the inline template training used

    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1 2"}], tokenize=False) == "1 2 "
    reference = load_causal_lm(tiny).eval()  # the snapshot's weights, loaded the learner's way
    reference.load_state_dict(load_snapshot_state(snapshot), strict=True)
    untrained = load_causal_lm(tiny).eval()
    expected = greedy(reference, load_tokenizer(tiny))
    assert greedy(exported, tokenizer) == expected
    assert expected != greedy(untrained, load_tokenizer(tiny))  # the weights exported are the trained ones


def test_an_old_snapshot_without_tokenizer_gets_the_jobs_tokenizer(tmp_path, tiny):
    run = run_layout(tmp_path, tiny, JobSpec(), tokenizer=False)
    out = export(run / "volume" / "snapshots" / "v2", tmp_path / "out")  # a snapshot dir: job.yaml found above it
    assert (out / "tokenizer.json").is_file()
    assert load_tokenizer(str(out)).encode("3 1 =", add_special_tokens=False) == \
        load_tokenizer(tiny).encode("3 1 =", add_special_tokens=False)


def test_without_tokenizer_or_job_the_error_says_pass_tokenizer(tmp_path, tiny):
    run = run_layout(tmp_path, tiny, JobSpec(), tokenizer=False)
    lone = tmp_path / "lone"
    shutil.copytree(run / "volume" / "snapshots" / "v4", lone)
    with pytest.raises(ExportError, match="--tokenizer"):
        export(lone, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = export(lone, tmp_path / "out", tokenizer=tiny)
    assert (out / "tokenizer.json").is_file()


def test_a_corrupt_snapshot_and_a_used_output_directory_are_refused(tmp_path, tiny):
    run = run_layout(tmp_path, tiny, JobSpec())
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export(run, used)
    assert (used / "keep.txt").read_text() == "mine"
    weights = run / "volume" / "snapshots" / "v4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="corrupt"):
        export(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where,version,expected", [
    ("runs/job", None, "runs/job/volume/snapshots/v4"),  # asyncrlhf run's directory: the newest
    ("runs/job", 2, "runs/job/volume/snapshots/v2"),
    ("runs/job/volume", None, "runs/job/volume/snapshots/v4"),  # a volume
    ("runs/job/volume/report", None, "runs/job/volume/snapshots/v4"),  # a cluster run's report directory
    ("runs/job/volume/snapshots/v2", None, "runs/job/volume/snapshots/v2"),  # a snapshot itself
])
def test_find_snapshot(tmp_path, where, version, expected):
    base = tmp_path / "runs" / "job" / "volume"
    for v in (2, 4):
        (base / "snapshots" / f"v{v}").mkdir(parents=True)
        (base / "snapshots" / f"v{v}" / "config.json").write_text("{}")
    (base / "report").mkdir()
    assert find_snapshot(tmp_path / where, version).snapshot == tmp_path / expected


def test_find_snapshot_errors_name_what_is_there(tmp_path):
    (tmp_path / "snapshots" / "v3").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"no snapshot v7 \(it has v3\)"):
        find_snapshot(tmp_path, 7)
    assert find_snapshot(tmp_path / "snapshots").snapshot == tmp_path / "snapshots" / "v3"  # the folder above works too
    (tmp_path / "empty" / "snapshots").mkdir(parents=True)
    with pytest.raises(ExportError, match="no snapshots found"):
        find_snapshot(tmp_path / "empty")
    with pytest.raises(ExportError, match="no such directory"):
        find_snapshot(tmp_path / "nothing")


def test_the_cli_exports_and_exits_2_on_a_bad_source(tmp_path, tiny):
    run = run_layout(tmp_path, tiny, JobSpec())
    cli = [sys.executable, "-m", "asyncrlhf.cli", "export"]
    done = subprocess.run(cli + [str(run), str(tmp_path / "out"), "--version", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "model.safetensors" in json.loads(done.stdout.split("\nload it")[0])["files"]
    bad = subprocess.run(cli + [str(tmp_path / "nothing"), str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such directory" in bad.stderr
