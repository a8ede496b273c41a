"""The `asyncrlhf` command driven as a person drives it, in a terminal (a pty, through pexpect):
`--version`, each subcommand's `--help`, `validate` on every example and on broken manifests, and
the quick start with `--steps 5`, whose console must show the start-up phases and the progress,
and no warning or INFO line from the libraries underneath (issue 17)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

from asyncrlhf import __version__

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
COMMANDS = ["run", "compare", "validate", "learner", "generator", "label", "export", "crd", "render", "operator"]
NOISE = re.compile(r"\bWARNING\b|\bWarning\b|\bINFO\b|\bUserWarning\b|Traceback")


def session(args: list[str], cwd: Path = REPO, timeout: float = 60, env: dict | None = None) -> tuple[int, str]:
    """Run `asyncrlhf ARGS` on a terminal of 160 columns; (exit status, what the terminal showed)."""
    child = pexpect.spawn(sys.executable, ["-m", "asyncrlhf.cli", *args], cwd=str(cwd), encoding="utf-8",
                          timeout=timeout, dimensions=(40, 160), env=env or dict(os.environ))
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before.replace("\r\n", "\n")


def test_version():
    status, shown = session(["--version"])
    assert (status, shown.strip()) == (0, f"asyncrlhf {__version__}")


def test_each_command_explains_its_flags():
    for command in COMMANDS:
        status, shown = session([command, "--help"])
        assert status == 0 and shown.startswith(f"usage: asyncrlhf {command}"), shown
        assert "options:" in shown and not NOISE.search(shown)
    _, crd = session(["crd", "--help"])
    assert "-o OUTPUT, --output OUTPUT" in crd and "--check" in crd and "--write" in crd


def test_validate_accepts_every_example():
    assert EXAMPLES
    for example in EXAMPLES:
        status, shown = session(["validate", str(example.relative_to(REPO))])
        assert status == 0, shown
        assert f"{example.relative_to(REPO)}: valid" in shown and "kind: AsyncRLHFJob" in shown
        assert not NOISE.search(shown), shown


BROKEN = {
    "unknown-field": ("spec:\n  model: {policy: builtin:tiny-sort}\n  learner: {totlSteps: 3}\n",
                      [], "spec.learner.totlSteps: unknown field"),
    "no-policy": ("spec:\n  learner: {totalSteps: 3}\n", [], "spec.model.policy"),
    "missing-prompt-file": ("spec:\n  model: {policy: builtin:tiny-sort}\n  task:\n"
                            "    prompts: {source: file, path: nowhere/prompts.jsonl}\n",
                            ["--local"], "nowhere/prompts.jsonl is not a file"),
    "python-reward-not-importable": ("spec:\n  model: {policy: builtin:tiny-sort}\n  task:\n"
                                     "    reward: {kind: python, function: 'not_here:score'}\n",
                                     ["--local"], "module not_here is not importable"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_validate_refuses_a_broken_manifest_with_its_reason(tmp_path, name):
    body, flags, reason = BROKEN[name]
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(f"apiVersion: asyncrlhf.dev/v1alpha1\nkind: AsyncRLHFJob\nmetadata: {{name: {name}}}\n{body}")
    status, shown = session(["validate", *flags, str(manifest)], cwd=tmp_path)
    assert status == 2 and reason in shown and "Traceback" not in shown, shown


@pytest.mark.slow
def test_the_quick_start_shows_progress_and_no_library_noise(tmp_path):
    """The README's quick start, 5 steps: the phases, the live step line, the outcome."""
    status, shown = session(["run", "examples/local-tiny.yaml", "--steps", "5", "--runs-dir", str(tmp_path)],
                            timeout=600)
    screen = [line.rsplit("\r", 1)[-1].replace("\x1b[2K", "") for line in shown.splitlines()]
    assert status == 0, shown[-3000:]
    for phase in ("model builtin:tiny-sort ready", "nats-server started", "learner ready",
                  "generator 0: vllm engine started", "first step trained"):
        assert any(line.startswith(f"  ok  {phase}") for line in screen), screen
    assert re.search(r"step 5/5 \[#{20}\] 100%", shown)
    assert any(line.startswith("done: 5/5 steps in") for line in screen), screen
    noise = [line for line in screen if NOISE.search(line)]
    assert not noise, noise
    assert (tmp_path / "tiny-sort" / "run.log").exists()
