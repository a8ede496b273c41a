"""Experiment trackers: the metric names (tables), and the real TensorBoard, wandb (offline) and MLflow
clients writing what they are given, read back with each tool's own reader; a restarted learner
continues the same runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncrlhf.api import JobSpec
from asyncrlhf.tracking import (
    MODULE_OF, TrackingError, Trackers, flatten, open_trackers, require, run_summary, tracker_metrics,
)

STEPS = [
    {"step": 1, "time": 0.5, "reward_mean": 0.25, "loss": 1.5, "policy_versions": [0], "samples": 32},
    {"step": 2, "time": 1.0, "reward_mean": 0.5, "loss": 1.25, "policy_versions": [0, 1], "samples": 32},
    {"step": 2, "kind": "eval", "time": 1.1, "policy_version": 2, "eval_reward_mean": 0.75, "eval_kl": 0.125},
]


@pytest.mark.parametrize("row,expected", [
    (STEPS[0], {"train/time": 0.5, "train/reward_mean": 0.25, "train/loss": 1.5, "train/samples": 32.0}),
    (STEPS[2], {"eval/time": 1.1, "eval/policy_version": 2.0, "eval/reward_mean": 0.75, "eval/kl": 0.125}),
    ({"step": 3, "loss": float("nan"), "ok": True, "name": "x", "kl": 0.5}, {"train/kl": 0.5}),  # NaN, bool, str out
])
def test_tracker_metrics(row, expected):
    assert tracker_metrics(row) == expected


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": {}, "g": None}) == \
        {"a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "{}", "g": "null"}


def test_run_summary():
    train = [{"step": s, "time": s * 2.0, "reward_mean": s / 10, "staleness_mean": s % 2, "staleness_max": s % 3,
              "consumed": 8 * s, "dropped": 0} for s in range(1, 11)]
    evals = [{"step": 0, "eval_reward_mean": 0.25, "eval_kl": 0.0}, {"step": 10, "eval_reward_mean": 0.5, "eval_kl": 2.0}]
    # window = max(1, min(10, 10 // 5)) = 2: steps 9 and 10 → (0.9 + 1.0) / 2
    assert run_summary(train, evals) == {
        "steps": 10, "training_seconds": 20.0, "final_reward_mean": pytest.approx(0.95),
        "staleness_mean": 0.5, "staleness_max": 2, "rollouts_consumed": 80, "rollouts_dropped": 0,
        "initial_eval_step": 0, "initial_eval_reward_mean": 0.25,
        "final_eval_step": 10, "final_eval_reward_mean": 0.5, "final_eval_kl": 2.0,
    }
    assert run_summary([], []) == {}


def test_spec_refuses_a_tracker_listed_twice_or_unknown():
    with pytest.raises(ValueError, match="wandb listed more than once"):
        JobSpec.model_validate({"tracking": {"backends": ["wandb", "tensorboard", "wandb"]}})
    with pytest.raises(ValueError, match="tracking.backends"):
        JobSpec.model_validate({"tracking": {"backends": ["comet"]}})


def test_no_backends_no_tracker_and_no_files(tmp_path):
    trackers = open_trackers(JobSpec(), tmp_path / "run", "job")
    assert trackers.trackers == {}
    trackers.log(STEPS[0])
    trackers.finish()
    trackers.close()
    assert not (tmp_path / "run").exists()


def test_a_missing_library_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(MODULE_OF, "wandb", "asyncrlhf_no_such_module")
    with pytest.raises(TrackingError, match=r"pip install 'asyncrlhf\[wandb\]'"):
        require("wandb")
    spec = JobSpec.model_validate({"tracking": {"backends": ["tensorboard", "wandb"]}})
    with pytest.raises(TrackingError, match="remove 'wandb' from tracking.backends"):
        open_trackers(spec, tmp_path, "job")
    assert not (tmp_path / "tensorboard").exists()  # checked before anything starts


class Failing:
    def log(self, metrics, step):
        raise ConnectionError("tracking server away")

    def summary(self, values):
        raise ConnectionError("tracking server away")

    def close(self):
        pass


def test_a_tracker_failing_while_logging_does_not_stop_the_others(tmp_path, caplog):
    class Recording(Failing):
        logged: list = []

        def log(self, metrics, step):
            self.logged.append((step, metrics))

    recording = Recording()
    trackers = Trackers({"mlflow": Failing(), "tensorboard": recording}, tmp_path)
    trackers.log(STEPS[0])
    assert recording.logged == [(1, tracker_metrics(STEPS[0]))]
    assert "tracker mlflow failed (ConnectionError: tracking server away)" in caplog.text


# --- the real clients -------------------------------------------------------------------------

def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a wandb run file (the LevelDB log format wandb writes: a 7-byte header, then
    32 KiB blocks of records with a 7-byte header each: checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir: Path) -> tuple[list[dict], dict, dict, str]:
    """(history rows, config, summary, run id) of the offline wandb runs under run_dir, oldest first."""
    history, config, summary, run_ids = [], {}, {}, set()
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                for i in record.history.item})
            elif kind == "summary":
                summary |= {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update}
            elif kind == "run":
                run_ids.add(record.run.run_id)
                config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
    assert len(run_ids) == 1, run_ids
    return history, config, summary, run_ids.pop()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory


def test_tensorboard_and_offline_wandb_get_every_step_and_a_restart_continues_the_runs(tmp_path, offline):
    spec = JobSpec.model_validate({"tracking": {"backends": ["tensorboard", "wandb"], "project": "sorting"},
                                   "learner": {"totalSteps": 3}})
    run = tmp_path / "run"
    first = open_trackers(spec, run, "job-a")
    for row in STEPS:
        first.log(row)
    first.log({"step": 3, "time": 1.5, "reward_mean": 0.0, "loss": 9.0})  # a step the restart will redo
    first.close()
    # the learner restarts from its checkpoint at step 2 and does step 3 again
    second = open_trackers(spec, run, "job-a", step=2)
    second.log({"step": 3, "time": 1.6, "reward_mean": 0.875, "loss": 1.0})
    second.finish()
    second.close()

    scalars = tensorboard_scalars(run / "tensorboard")
    assert scalars["train/reward_mean"] == [(1, 0.25), (2, 0.5), (3, 0.875)]  # step 3's first try purged
    assert scalars["eval/reward_mean"] == [(2, 0.75)] and scalars["eval/kl"] == [(2, 0.125)]

    history, config, _, run_id = wandb_history(run)
    assert json.loads((run / "tracking.json").read_text()) == {"wandb": run_id}  # both runs: one wandb run
    steps = [(h["_step"], h.get("train/reward_mean"), h.get("eval/reward_mean")) for h in history]
    assert steps[:2] == [(1, 0.25, None), (2, 0.5, 0.75)]  # a step's line and its evaluation: one row
    assert steps[-1] == (3, 0.875, None)
    assert config["learner"]["totalSteps"] == 3 and config["tracking"]["project"] == "sorting"
    assert not list(tmp_path.glob("wandb"))  # under the run directory, not the working directory


def test_mlflow_gets_params_metrics_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    # the file store stands in for a tracking server (MLflow deprecates it for real use; its client calls are the same)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    spec = JobSpec.model_validate({"tracking": {"backends": ["mlflow"], "project": "sorting", "runName": "first"}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r | {"staleness_mean": 0, "staleness_max": 0,
                                                               "consumed": 8, "dropped": 0}) + "\n" for r in STEPS))
    trackers = open_trackers(spec, run, "job")
    for row in STEPS:
        trackers.log(row)
    trackers.finish()
    trackers.close()

    client = MlflowClient()
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]
    got = client.get_run(run_id)
    assert got.info.run_name == "first" and got.info.status == "FINISHED"
    assert client.get_experiment(got.info.experiment_id).name == "sorting"
    assert got.data.params["algorithm.loss"] == "online-dpo" and got.data.params["tracking.backends"] == '["mlflow"]'
    history = client.get_metric_history(run_id, "train/reward_mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.25), (2, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/kl")] == [(2, 0.125)]
    assert got.data.tags["summary.final_eval_reward_mean"] == "0.75"
