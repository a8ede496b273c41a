"""Which devices a run's processes really used: each workload process writes, at exit, the most
CUDA memory it allocated (`<run dir>/devices/<process>.json`); `asyncrlhf run` puts them in
summary.json (`cuda_max_memory_allocated`), so a GPU run can show every model was on a GPU
(scripts/gpu-smoke.sh checks it)."""

from __future__ import annotations

import atexit
import json
import os
import re
from pathlib import Path
from typing import Callable

from .workload_env import RUN_DIR

SUBDIR = "devices"


def report_at_exit(process: str, max_memory: Callable[[], int]) -> None:
    """At exit, record `max_memory()` (bytes of CUDA memory) for `process` in the run directory."""
    run_dir = os.environ.get(RUN_DIR)
    if not run_dir:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", process)

    def write() -> None:
        try:
            memory = int(max_memory())
        except Exception:  # noqa: BLE001 - a report must never fail the process's exit
            return
        target = Path(run_dir) / SUBDIR
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{name}.json").write_text(json.dumps({"process": process, "cuda_max_memory_allocated": memory}))

    atexit.register(write)


def read_reports(run_dir: str | Path) -> dict[str, int]:
    """{process: bytes} of every report in the run directory."""
    out = {}
    for f in sorted((Path(run_dir) / SUBDIR).glob("*.json")):
        try:
            entry = json.loads(f.read_text())
            out[entry["process"]] = int(entry["cuda_max_memory_allocated"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
