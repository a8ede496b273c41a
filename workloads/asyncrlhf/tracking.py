"""Experiment trackers (spec.tracking): TensorBoard, Weights & Biases, MLflow.

Every line the learner writes to metrics.jsonl also goes to each tracker (RunLog forwards it):
a training step's numbers as `train/<name>`, an evaluation's (`kind: eval`) as `eval/<name>`, at
the step the line carries. The job's spec goes in once as the run's config, and the learner
closes the run with a summary (final numbers, counters).

Why like this:
  * Each client library is imported only when its tracker is asked for, and each is an optional
    extra (`pip install 'asyncrlhf[tensorboard,wandb,mlflow]'`): a job without trackers needs none.
  * Offline works: TensorBoard writes event files under `<run dir>/tensorboard/`; wandb keeps its
    run under `<run dir>/wandb/` and runs offline with WANDB_MODE=offline (sync later with
    `wandb sync`); MLflow logs to MLFLOW_TRACKING_URI, else to `<run dir>/mlflow.db`.
  * Credentials come only from the environment (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...; on a
    cluster from tracking.credentialsSecret); nothing here reads, logs or stores them.
  * A restarted learner continues the same runs: the wandb and MLflow run ids are kept in
    `<run dir>/tracking.json`, and TensorBoard drops the events past the checkpoint (purge_step),
    as metrics.jsonl does.
  * A tracker that fails while logging (a tracking server away) is warned about, never fatal:
    metrics.jsonl has every number anyway. Failing to start is fatal, with what to do.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Protocol

from .api import JobSpec
from .report import EVAL_KIND, eval_summary, read_evals, read_metrics

log = logging.getLogger("asyncrlhf.tracking")
RUN_IDS = "tracking.json"
EXTRA_OF = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
MODULE_OF = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_NOT_METRICS = {"step", "kind"}


class TrackingError(RuntimeError):
    """A tracker the spec asks for cannot start (library missing, not logged in, ...)."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


# --- pure helpers -----------------------------------------------------------------------------

def tracker_metrics(row: dict) -> dict[str, float]:
    """A metrics.jsonl line as tracker scalars: `train/x` for a step's line, `eval/x` for an
    evaluation's (its `eval_` prefix dropped); non-numbers (lists, strings) and NaN left out."""
    is_eval = row.get("kind") == EVAL_KIND
    out = {}
    for key, value in row.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        name = key.removeprefix("eval_") if is_eval else key
        out[f"{'eval' if is_eval else 'train'}/{name}"] = float(value)
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config as `a.b.c: value` strings (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def run_summary(train: list[dict], evals: list[dict]) -> dict[str, Any]:
    """The final numbers of a run, from its metrics.jsonl lines (reward averaged over the last
    min(10, steps/5) steps, as the local report does)."""
    out: dict[str, Any] = {}
    if train:
        window = max(1, min(10, len(train) // 5))
        last = train[-1]
        out.update(steps=last["step"], training_seconds=last["time"],
                   final_reward_mean=sum(r["reward_mean"] for r in train[-window:]) / window,
                   staleness_mean=sum(r["staleness_mean"] for r in train) / len(train),
                   staleness_max=max(r["staleness_max"] for r in train),
                   rollouts_consumed=last["consumed"], rollouts_dropped=last["dropped"])
    return out | eval_summary(evals)


def require(name: str) -> None:
    """Fail with the install command when a tracker's library is missing."""
    if importlib.util.find_spec(MODULE_OF[name]) is None:
        raise TrackingError(
            f"spec.tracking.backends lists {name!r}, but the {MODULE_OF[name]} package is not installed: "
            f"pip install 'asyncrlhf[{name}]' (or {EXTRA_OF[name]}), or remove {name!r} from tracking.backends"
        )


# --- the trackers -----------------------------------------------------------------------------

class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict, purge_step: int) -> None:
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        # a resumed learner logs the steps after its checkpoint again: drop the old ones first
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step or None)
        self.writer.add_text("config", _markdown_json(config), global_step=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def summary(self, values: dict[str, Any]) -> None:
        self.writer.add_text("summary", _markdown_json(values), global_step=values.get("steps", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, project: str, name: str, run_id: Optional[str]) -> None:
        require("wandb")
        import wandb

        # a read-only root filesystem (the pods): wandb's caches go under the run directory
        for var, sub in (("WANDB_CACHE_DIR", ".wandb-cache"), ("WANDB_CONFIG_DIR", ".wandb-config"),
                         ("WANDB_DATA_DIR", ".wandb-data")):
            os.environ.setdefault(var, str(run_dir / sub))
        try:
            self.run = wandb.init(project=project, name=name, id=run_id,
                                  resume="allow", dir=str(run_dir), config=config, reinit="create_new")
        except Exception as err:  # wandb raises its own UsageError/CommError kinds
            raise TrackingError(
                f"tracking: wandb could not start a run ({type(err).__name__}: {err}); set WANDB_API_KEY "
                "(on a cluster through tracking.credentialsSecret) or WANDB_MODE=offline"
            ) from err
        self.run_id = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict, project: str, name: str, run_id: Optional[str]) -> None:
        require("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                found = self.client.get_experiment_by_name(project)
                experiment = found.experiment_id if found else self.client.create_experiment(project)
                run_id = self.client.create_run(experiment, run_name=name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as err:
            raise TrackingError(
                f"tracking: MLflow could not start a run at MLFLOW_TRACKING_URI={_without_secrets(uri)} "
                f"({type(err).__name__}: {err}); point MLFLOW_TRACKING_URI at your tracking server (its "
                "token in MLFLOW_TRACKING_TOKEN), or install the full 'mlflow' package for the local store"
            ) from err
        self.run_id = run_id
        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            _warn_on_error("mlflow", lambda chunk=params[i:i + 100]: self.client.log_batch(run_id, params=chunk))

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, f"summary.{key}", str(value))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# --- all of a job's trackers ------------------------------------------------------------------

class Trackers:
    """The job's trackers, used as one; no backends = does nothing."""

    def __init__(self, trackers: dict[str, Tracker], run_dir: Path) -> None:
        self.trackers, self.run_dir = trackers, run_dir

    def log(self, row: dict) -> None:
        metrics = tracker_metrics(row)
        for name, tracker in self.trackers.items():
            _warn_on_error(name, lambda t=tracker: t.log(metrics, int(row["step"])))

    def finish(self) -> None:
        """The run's summary (from metrics.jsonl: all of it, also the steps before a restart)."""
        if not self.trackers:
            return
        values = run_summary(read_metrics(self.run_dir), read_evals(self.run_dir))
        for name, tracker in self.trackers.items():
            _warn_on_error(name, lambda t=tracker: t.summary(values))

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            _warn_on_error(name, tracker.close)
        self.trackers = {}


def open_trackers(spec: JobSpec, run_dir: str | Path, job_name: str, step: int = 0) -> Trackers:
    """Start the trackers spec.tracking lists (resuming the runs of an earlier learner of this job);
    `step` is the restored checkpoint's step."""
    run_dir = Path(run_dir)
    tracking = spec.tracking
    if not tracking.backends:
        return Trackers({}, run_dir)
    for name in tracking.backends:
        require(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = spec.model_dump(by_alias=True, mode="json")
    name = tracking.run_name or job_name
    ids = _read_ids(run_dir)
    opened: dict[str, Tracker] = {}
    try:
        for backend in tracking.backends:
            if backend == "tensorboard":
                opened[backend] = TensorBoardTracker(run_dir, config, purge_step=step + 1 if step else 0)
            elif backend == "wandb":
                opened[backend] = WandbTracker(run_dir, config, tracking.project, name, ids.get("wandb"))
            else:
                opened[backend] = MlflowTracker(run_dir, config, tracking.project, name, ids.get("mlflow"))
    except BaseException:
        Trackers(opened, run_dir).close()
        raise
    _write_ids(run_dir, {k: t.run_id for k, t in opened.items() if hasattr(t, "run_id")})
    log.info("tracking to %s", ", ".join(opened))
    return Trackers(opened, run_dir)


def _read_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / RUN_IDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_ids(run_dir: Path, ids: dict[str, str]) -> None:
    if ids:
        tmp = run_dir / (RUN_IDS + ".tmp")
        tmp.write_text(json.dumps(_read_ids(run_dir) | ids, indent=1) + "\n")
        os.replace(tmp, run_dir / RUN_IDS)


def _warn_on_error(name: str, call) -> None:
    try:
        call()
    except Exception as err:  # a tracker must never stop training: metrics.jsonl has every number
        log.warning("tracker %s failed (%s: %s); training goes on, metrics.jsonl has every number",
                    name, type(err).__name__, err)


def _markdown_json(values: dict) -> str:
    # TensorBoard renders text as Markdown: indent four spaces for a code block
    return "\n".join("    " + line for line in json.dumps(values, indent=2).splitlines())


def _without_secrets(uri: str) -> str:
    """A URI as it may be shown: any user:password@ part masked."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
