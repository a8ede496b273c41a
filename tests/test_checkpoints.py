"""Checkpoints and the atomic directory write under them (no model, no bus)."""

from __future__ import annotations

import pytest

from asyncrlhf.checkpoints import CHECKPOINTS_KEPT, CheckpointStore, LearnerState
from asyncrlhf.snapshots import SnapshotInfo, write_snapshot
from asyncrlhf.storage import TMP_PREFIX, atomic_dir


def snapshot(root, version: int) -> SnapshotInfo:
    return write_snapshot(root, version, lambda d: (d / "model.safetensors").write_bytes(b"w%d" % version))


def save(store: CheckpointStore, root, step: int) -> None:
    store.save(LearnerState(step=step, published_version=step, consumed=3 * step), snapshot(root, step),
               lambda d: (d / "optimizer.json").write_text("{}"))


def test_save_then_load_round_trips_the_state_and_the_snapshot(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.load() is None and not store.exists()
    save(store, tmp_path, 4)
    cp = store.load()
    assert (cp.state.step, cp.state.consumed) == (4, 12)
    assert cp.snapshot.version == 4 and cp.snapshot.path.endswith("snapshots/v4")
    assert (cp.directory / "optimizer.json").read_text() == "{}"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TMP_PREFIX)]  # no temporary left


def test_only_the_newest_are_kept(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in range(1, 6):
        save(store, tmp_path, step)
    assert store.steps() == list(range(6 - CHECKPOINTS_KEPT, 6))
    assert store.load().state.step == 5


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, tmp_path, 1)
    save(store, tmp_path, 2)
    (store.directory(2) / "state.json").write_text('{"step": 2, "trunc')  # torn by a disk fault
    assert store.load().state.step == 1
    (store.directory(1) / "state.json").unlink()
    assert store.load() is None


def test_latest_pointing_nowhere_is_survived(tmp_path):
    store = CheckpointStore(tmp_path)
    save(store, tmp_path, 3)
    (store.base / "LATEST").write_text("step-99")
    assert store.load().state.step == 3


def test_an_error_inside_atomic_dir_leaves_the_old_directory_and_no_temporary(tmp_path):
    final = tmp_path / "thing"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(OSError):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("new, half written")
            raise OSError(28, "No space left on device")
    assert (final / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]
