"""Snapshots: atomic, verified before loading; a partial or corrupt one is refused and the old weights stay."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from asyncrlhf.api import JobSpec
from asyncrlhf.engines.hf import HFEngine
from asyncrlhf.generator import Generator
from asyncrlhf.messages import WeightsAnnouncement
from asyncrlhf.models import load_causal_lm, resolve_model
from asyncrlhf.snapshots import (
    MANIFEST, SnapshotError, list_versions, prune_snapshots, verify_snapshot, write_snapshot,
)


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model("builtin:tiny-sort")


def save_perturbed(tiny: str, seed: int):
    model = load_causal_lm(tiny)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def test_write_verify_list_prune(tmp_path, tiny):
    model = load_causal_lm(tiny)
    infos = [write_snapshot(tmp_path, v, model.save_pretrained) for v in range(5)]
    assert list_versions(tmp_path) == [0, 1, 2, 3, 4]
    manifest = verify_snapshot(infos[4].path, infos[4].checksum)
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "snapshots").iterdir())
    assert prune_snapshots(tmp_path, keep=2, in_use=[1]) == [0, 2]
    assert list_versions(tmp_path) == [1, 3, 4]


def corrupt_file(path: str) -> None:
    f = Path(path) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, words", [
    (lambda p: os.remove(Path(p) / MANIFEST), "no MANIFEST.json"),
    (lambda p: os.remove(Path(p) / "model.safetensors"), "missing"),
    (corrupt_file, "corrupt"),
    (lambda p: (Path(p) / "model.safetensors").write_bytes(b"trunc"), "corrupt"),
])
def test_damaged_snapshot_is_refused(tmp_path, tiny, damage, words):
    info = write_snapshot(tmp_path, 1, load_causal_lm(tiny).save_pretrained)
    damage(info.path)
    with pytest.raises(SnapshotError, match=words):
        verify_snapshot(info.path, info.checksum)


def test_wrong_checksum_is_refused(tmp_path, tiny):
    info = write_snapshot(tmp_path, 1, load_causal_lm(tiny).save_pretrained)
    with pytest.raises(SnapshotError, match="checksum"):
        verify_snapshot(info.path, "0" * 64)


def test_generator_keeps_old_weights_on_a_corrupt_snapshot(tmp_path, tiny):
    spec = JobSpec.model_validate({"generator": {"engine": "hf"}})
    engine = HFEngine(spec, tiny)
    gen = Generator(spec, bus=None, nats_url="", generator_id="g", engine=engine)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}

    good = write_snapshot(tmp_path, 1, save_perturbed(tiny, 1).save_pretrained)
    bad = write_snapshot(tmp_path, 2, save_perturbed(tiny, 2).save_pretrained)
    corrupt_file(bad.path)

    assert not gen.try_reload(WeightsAnnouncement(version=2, path=bad.path, checksum=bad.checksum))
    assert gen.state.version == 0
    assert all(torch.equal(before[k], v) for k, v in engine.model.state_dict().items())

    assert gen.try_reload(WeightsAnnouncement(version=1, path=good.path, checksum=good.checksum))
    assert gen.state.version == 1
    expected = load_causal_lm(good.path).state_dict()
    assert all(torch.equal(expected[k], v) for k, v in engine.model.state_dict().items())
    # a snapshot that failed once is not retried (its checksum is remembered)
    assert not gen.try_reload(WeightsAnnouncement(version=2, path=bad.path, checksum=bad.checksum))

