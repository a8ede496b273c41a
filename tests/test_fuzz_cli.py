"""Fuzzing the commands a person runs on a manifest: `asyncrlhf validate` and `asyncrlhf run
--dry-run`, end to end through `cli.main` (in this process: a subprocess per manifest would cost
seconds each), with hostile manifests from test_fuzz_manifests' strategy. Whatever the file holds,
the command ends with exit 0, or 2 with `error: ...` lines naming what is wrong: never a
traceback, never another exit code, never a hang.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import event, given, settings

from asyncrlhf import cli
from test_fuzz_manifests import FUZZ, mutated_manifests, time_limit

SECONDS_PER_COMMAND = 20  # far above what one takes: only a hang trips it


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `asyncrlhf <argv>`; the logging it set up is undone after
    (its handlers write to this call's captured stderr)."""
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), time_limit(SECONDS_PER_COMMAND):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            root.handlers[:], root.level = handlers, level
    return code, out.getvalue()


def check(code: int, output: str, command: str) -> None:
    event(f"{command}: exit {code}")
    assert "Traceback" not in output, output
    assert code in (0, 2), (code, output)
    if code == 2:
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert errors and all(len(line) > len("error: ") + 5 for line in errors), output


@pytest.fixture(autouse=True, scope="module")
def offline():
    """--dry-run reads a hub model's config for its attention heads: never from the network here.
    The heavy imports happen first, outside the per-command time limit."""
    import asyncrlhf.local  # noqa: F401 -- torch, transformers
    import asyncrlhf.preflight  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@settings(FUZZ, max_examples=80)
@given(mutated_manifests())
def test_validate_and_dry_run_answer_every_manifest_with_0_or_2(doc):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
        check(*run_cli(["validate", str(path)]), "validate")
        check(*run_cli(["run", "--dry-run", str(path), "--runs-dir", os.path.join(tmp, "runs")]), "run --dry-run")
