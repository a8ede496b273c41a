"""The pieces behind a newcomer's first hour (issue 17), each without starting a run: the version,
every flag's help, the log filters, the failure line, the start-up milestones, the progress line,
validate's offline checks and effective manifest, and `asyncrlhf crd`'s refusal to overwrite
tracked files."""

from __future__ import annotations

import argparse
import io
import logging
import logging.config
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import asyncrlhf
from asyncrlhf import cli, logs
from asyncrlhf.api import AsyncRLHFJob
from asyncrlhf.console import Console, Failure, Observed, StartupWatch, eta, outcome_lines, progress_line
from asyncrlhf.manifest import load_manifest
from asyncrlhf.messages import LearnerProgress
from asyncrlhf.preflight import effective_manifest, problems, quantity

REPO = Path(__file__).resolve().parents[1]


def test_the_version_is_pyprojects():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert asyncrlhf.__version__ == pyproject["project"]["version"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_has_a_one_line_help():
    parser = cli.build_parser()
    commands = _subparsers(parser)
    assert {"run", "compare", "validate", "crd", "export", "label", "render", "operator"} <= set(commands)
    missing = [f"{name} {a.dest}" for name, sub in commands.items() for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"flags without help: {missing}"
    crd = commands["crd"].format_help()
    assert "-o OUTPUT" in crd and "--check" in crd and "--write" in crd and "stdout" in crd


# --- logs ------------------------------------------------------------------------------------


def _record(msg: str, level: int = logging.WARNING, name: str = "vllm.x") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_a_repeated_warning_is_written_once_then_as_counts():
    f = logs.RepeatFilter()
    passed = [n for n in range(1, 1001) if f.filter(rec := _record("RotaryEmbedding: Failed to load weights"))
              and (n == 1 or "repeated" in rec.getMessage())]
    assert passed == [1, 10, 100, 1000]
    assert f.filter(_record("another warning")) and f.filter(_record("another warning", name="other"))
    info = [f.filter(_record("Reloading weights", logging.INFO)) for _ in range(3)]
    assert info == [True, True, True]  # only warnings and errors are collapsed


@pytest.fixture
def console_logging_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.setLoggerClass(logging.Logger)
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_console_shows_our_warnings_and_anyones_errors(console_logging_restored, verbose, capsys):
    logs.console_logging(verbose)
    library = logging.getLogger(f"somelibrary{verbose}")  # created after: its own handler is guarded
    library.propagate = False
    library.addHandler(logging.StreamHandler(sys.stderr))
    library.warning("Setting accelerator to CPU")
    library.error("library error")
    logging.getLogger("asyncrlhf.bus").warning("our warning")
    logging.getLogger("asyncrlhf.bus").info("our info")
    err = capsys.readouterr().err
    assert "our warning" in err and "library error" in err
    assert ("Setting accelerator to CPU" in err) == verbose and ("our info" in err) == verbose


@pytest.mark.parametrize("tail, reason", [
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
     "OSError: [Errno 28] No space left on device (injected at snapshot-write)\n"
     "2026-01-01 00:00:00,000 INFO asyncrlhf.bus: NATS: disconnected\n",
     "OSError: [Errno 28] No space left on device (injected at snapshot-write)"),
    ("error: spec.learner.totalSteps: must be >= 1\n", "spec.learner.totalSteps: must be >= 1"),
    ("2026-01-01 00:00:00,000 ERROR asyncrlhf.generator: refusing snapshot v3: bad digest\n",
     "refusing snapshot v3: bad digest"),
    ("2026-01-01 00:00:00,000 INFO asyncrlhf.learner: all fine\n", None),
])
def test_the_reason_of_a_failure_is_the_last_error_line_of_its_log(tmp_path, tail, reason):
    log = tmp_path / "learner-0.log"
    log.write_text("noise\n" * 100 + tail)
    assert logs.last_error(log) == reason


def test_vllm_gets_a_logging_config_with_the_repeat_filter():
    config = logs.vllm_config()
    handler = {k: v for k, v in config["handlers"]["vllm"].items() if k != "formatter"}
    logging.config.dictConfig({**config, "formatters": {}, "handlers": {"vllm": handler}})
    try:  # vLLM's own handler (its formatter aside, to keep vLLM unimported) carries the filter
        (installed,) = logging.getLogger("vllm").handlers
        assert [type(f) for f in installed.filters] == [logs.RepeatFilter]
    finally:
        logging.getLogger("vllm").handlers.clear()


# --- the console of `asyncrlhf run` -----------------------------------------------------------


def test_startup_milestones_complete_in_order_with_their_times():
    watch = StartupWatch(generators=2, engine="vllm", started=100.0)
    assert "learner" in watch.current() and "generator-1" in watch.current()
    assert watch.update(Observed(), now=101) == []
    assert [line.split()[1:3] for line in watch.update(Observed(learner_ready=True, generators=frozenset({1})), 130)] \
        == [["learner", "ready"], ["generator", "1:"]]
    assert list(watch.current()) == ["generator-0"]
    lines = watch.update(Observed(True, frozenset({0, 1}), stepped=True, snapshots=1), now=160.5)
    assert [line.split()[-2] for line in lines] == ["60.5"] * 3 and watch.complete


def test_eta_and_the_progress_line():
    assert eta(3, 10, None, 50.0) is None and eta(3, 10, (3, 40.0), 50.0) is None
    assert eta(5, 10, (1, 10.0), 30.0) == pytest.approx(25.0)
    p = LearnerProgress(step=5, total_steps=10, policy_version=5, reward_mean=0.4, staleness_mean=0.8,
                        staleness_max=1, samples_per_second=200.0)
    line = progress_line(p, 75.0, bar=True)
    assert line.startswith("step 5/10 [##########..........]  50%  ETA 1:15  reward 0.400")
    assert "staleness 0.80 (max 1)" in line and "samples/s 200.0" in line


def test_a_console_in_a_pipe_prints_each_change_once_and_nothing_when_quiet():
    out = io.StringIO()
    console = Console(out=out)
    for _ in range(3):
        console.waiting({"learner": "learner: loading"}, 1.0)
    console.line("  ok  learner ready")
    assert out.getvalue().splitlines() == ["  ... learner: loading", "  ok  learner ready"]
    quiet = io.StringIO()
    Console(quiet=True, out=quiet).line("x")
    assert quiet.getvalue() == ""


def test_a_failed_run_ends_with_one_line_that_the_summary_carries(tmp_path):
    failure = Failure("learner", 2, "OSError: [Errno 28] No space left on device", "runs/x/learner-0.log", 1)
    assert failure.line() == ("FAILED: learner at step 2, exit 1: OSError: [Errno 28] No space left on device "
                              "(full log: runs/x/learner-0.log)")
    lines = outcome_lines({"ok": False, "failure": failure.as_dict()}, tmp_path)
    assert lines[0] == failure.line() and len(lines) == 2
    done = outcome_lines({"ok": True, "steps": 5, "total_steps": 5, "wall_clock_seconds": 86.2, "training_seconds": 2.2,
                          "initial_reward_mean": 0.344, "final_reward_mean": 0.395, "staleness_mean": 0.8,
                          "staleness_max": 1}, tmp_path)
    assert done[0] == "done: 5/5 steps in 86 s (training 2.2 s); reward 0.344 -> 0.395; staleness mean 0.80 max 1"


# --- validate ---------------------------------------------------------------------------------


def test_the_effective_manifest_shows_only_what_applies():
    tiny = effective_manifest(load_manifest(REPO / "examples" / "local-tiny.yaml"))["spec"]
    assert tiny["task"]["reward"] == {"rule": "sort-digits", "kind": "rule", "noEosPenalty": -1.0}
    assert tiny["task"]["prompts"] == {"source": "builtin", "name": "sort-digits"}
    assert "kvCacheGiB" in tiny["generator"] and "memoryFraction" not in tiny["generator"]
    assert "gamma" not in tiny["algorithm"] and "zeroStage" not in tiny["learner"]
    gpu = effective_manifest(load_manifest(REPO / "examples" / "gsm8k-online-dpo.yaml"))["spec"]
    assert "kvCacheGiB" not in gpu["generator"] and "memoryFraction" in gpu["generator"]
    model = effective_manifest(AsyncRLHFJob.model_validate({
        "apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "m"},
        "spec": {"model": {"policy": "org/policy"}, "task": {"reward": {"kind": "model", "model": "org/rm"}}}}))
    assert "rule" not in model["spec"]["task"]["reward"] and model["spec"]["task"]["reward"]["model"] == "org/rm"


def _job(tmp_path, **task) -> tuple[AsyncRLHFJob, Path]:
    manifest = tmp_path / "job.yaml"
    doc = {"apiVersion": "asyncrlhf.dev/v1alpha1", "kind": "AsyncRLHFJob", "metadata": {"name": "v"},
           "spec": {"model": {"policy": "builtin:tiny-sort"}, "task": task}}
    manifest.write_text(yaml.safe_dump(doc))
    return load_manifest(manifest), manifest


def test_validate_finds_what_would_fail_a_local_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job, manifest = _job(tmp_path, prompts={"source": "file", "path": "missing.jsonl"},
                         reward={"kind": "python", "function": "no_such_module_here:score"})
    errors, here = problems(job, manifest)
    assert errors == []
    assert any("missing.jsonl is not a file" in p for p in here)
    assert any("module no_such_module_here is not importable" in p for p in here)
    (tmp_path / "missing.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "no_such_module_here.py").write_text("def score(p, c, **k):\n    return [0.0] * len(c)\n")
    assert problems(job, manifest) == ([], [])


def test_validate_exits_2_with_the_reason_and_0_when_valid(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, manifest = _job(tmp_path, prompts={"source": "file", "path": "missing.jsonl"})
    assert cli.main(["validate", str(manifest)]) == 0  # a cluster's volume may have the file
    assert "`asyncrlhf run` on this machine would fail" in capsys.readouterr().err
    assert cli.main(["validate", "--local", str(manifest)]) == 2
    assert "missing.jsonl is not a file" in capsys.readouterr().err


def test_quantities():
    assert quantity("500m") == 0.5 and quantity("3Gi") == 3 << 30 and quantity("2") == 2
    with pytest.raises(ValueError):
        quantity("lots")


# --- crd --------------------------------------------------------------------------------------


def test_crd_prints_by_default_and_does_not_overwrite_a_tracked_file(tmp_path, capsys):
    committed = REPO / "crds" / "asyncrlhf.dev_asyncrlhfjobs.yaml"
    before = committed.stat().st_mtime_ns
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out.startswith("# Generated from")
    assert cli.main(["crd", "-o", str(committed)]) == 2
    assert "tracked by git: pass --force" in capsys.readouterr().err
    assert committed.stat().st_mtime_ns == before
    assert cli.main(["crd", "-o", str(tmp_path / "crd.yaml")]) == 0
    assert cli.main(["crd", "-o", str(tmp_path / "crd.yaml"), "--check"]) == 0
