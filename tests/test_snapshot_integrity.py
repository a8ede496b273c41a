"""What a generator refuses to load, and when it tries a refused snapshot again."""

from __future__ import annotations

import hashlib
import json

import pytest

from asyncrlhf.refusals import RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, RefusalLog
from asyncrlhf.snapshots import MANIFEST, SnapshotError, confined, load_snapshot_state, verify_snapshot, write_snapshot
from asyncrlhf.storage import remove_stale_tmp


def tiny_snapshot(root, version: int = 3):
    from safetensors.torch import save_file
    import torch

    def save(directory):
        save_file({"w": torch.ones(2)}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text("{}")

    return write_snapshot(root, version, save)


def rewrite_manifest(info, change) -> str:
    """Edit a snapshot's manifest; the new checksum (an attacker can announce any checksum)."""
    path = f"{info.path}/{MANIFEST}"
    manifest = json.loads(open(path).read())
    change(manifest)
    raw = json.dumps(manifest).encode()
    open(path, "wb").write(raw)
    return hashlib.sha256(raw).hexdigest()


def test_a_weight_file_outside_the_manifest_is_refused_and_never_loaded(tmp_path):
    info = tiny_snapshot(tmp_path)
    from safetensors.torch import save_file
    import torch

    save_file({"lm_head.weight": torch.zeros(2)}, f"{info.path}/zz-override.safetensors")
    with pytest.raises(SnapshotError, match="weight files not in the manifest: zz-override.safetensors"):
        verify_snapshot(info.path, info.checksum)
    assert set(load_snapshot_state(info.path)) == {"w"}  # the learner's own read lists the manifest only


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/file", ".hidden", ""])
def test_manifest_names_that_leave_the_directory_are_refused(tmp_path, name):
    info = tiny_snapshot(tmp_path)
    checksum = rewrite_manifest(info, lambda m: m["files"].update({name: {"size": 1, "blake3": "0"}}))
    with pytest.raises(SnapshotError, match="not a plain file name"):
        verify_snapshot(info.path, checksum)


def test_the_announced_version_must_be_the_manifests(tmp_path):
    info = tiny_snapshot(tmp_path, version=3)
    verify_snapshot(info.path, info.checksum, version=3)
    with pytest.raises(SnapshotError, match="the manifest says version 3, the announcement 4"):
        verify_snapshot(info.path, info.checksum, version=4)
    checksum = rewrite_manifest(info, lambda m: m.pop("files"))
    with pytest.raises(SnapshotError, match="not a valid manifest"):
        verify_snapshot(info.path, checksum)


def test_announced_paths_must_be_snapshot_directories_under_the_root(tmp_path):
    info = tiny_snapshot(tmp_path / "vol")
    assert confined(info.path, tmp_path / "vol") == (tmp_path / "vol" / "snapshots" / "v3").resolve()
    for path in (tmp_path / "elsewhere" / "snapshots" / "v3", tmp_path / "vol" / "snapshots" / "v3" / "..",
                 tmp_path / "vol" / "checkpoints" / "step-3", "/etc"):
        with pytest.raises(SnapshotError, match="not a snapshot directory under"):
            confined(path, tmp_path / "vol")


def test_a_refused_snapshot_is_tried_again_later_with_a_growing_delay():
    log = RefusalLog()
    assert log.may_try("abc", now=0.0)
    first = log.refuse(3, "abc", "EIO", now=0.0)
    assert first.retry_at == RETRY_FIRST_SECONDS and not log.may_try("abc", now=1.0) and log.may_try("other", 1.0)
    assert log.may_try("abc", now=RETRY_FIRST_SECONDS)
    delays = [log.refuse(3, "abc", "EIO", now=100.0).retry_at - 100.0 for _ in range(6)]
    assert delays == [10.0, 20.0, 40.0, RETRY_MAX_SECONDS, RETRY_MAX_SECONDS, RETRY_MAX_SECONDS]
    assert log.latest.reason == "EIO" and log.latest.failures == 7
    log.loaded("abc")
    assert log.latest is None and log.may_try("abc", now=100.0)


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "snapshots" / ".tmp-v4-123").mkdir(parents=True)
    (tmp_path / "snapshots" / ".tmp-v4-123" / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "snapshots" / "v3").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-LATEST-9").write_text("step-3")
    removed = remove_stale_tmp(tmp_path / "snapshots", tmp_path / "checkpoints", tmp_path / "absent")
    assert sorted(p.name for p in removed) == [".tmp-LATEST-9", ".tmp-v4-123"]
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == ["v3"]


def test_a_local_model_path_that_is_not_there_is_refused_at_once(tmp_path):
    from asyncrlhf.models import ModelNotFoundError, resolve_model

    with pytest.raises(ModelNotFoundError, match="no such directory on this machine"):
        resolve_model(str(tmp_path / "missing-model"))
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("org/hub-model") == "org/hub-model"  # a hub id is left to transformers
