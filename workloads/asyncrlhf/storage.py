"""Durable writes on the shared volume: the one atomic directory write and the one atomic file write.

Snapshots and checkpoints are both directories that readers must see whole or not at all, and a
learner acks rollouts once a checkpoint is on disk, so "on disk" has to mean it: every file is
fsynced, then the directory, then it is renamed into place and the parent is fsynced (a rename is
only durable once its directory is). A file that points at one of them (`LATEST`) is written the
same way. Temporary names start with `.tmp-`, so readers that list a directory skip them.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then each directory bottom-up."""
    for here, _, files in os.walk(directory, topdown=False):
        for name in files:
            with open(os.path.join(here, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(here))


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; when the block ends without an error, it
    is fsynced and renamed to `final` (replacing a `final` left by an earlier attempt). On an
    error the temporary directory is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():  # a re-run after a crash between the rename and what followed it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_tmp(*directories: Path) -> list[Path]:
    """Remove the temporary entries a writer killed mid-write left (one model copy per crash).
    Only for directories with a single writer, called by that writer before it writes."""
    removed = []
    for directory in directories:
        if Path(directory).is_dir():
            for entry in Path(directory).iterdir():
                if entry.name.startswith(TMP_PREFIX):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    removed.append(entry)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, durably."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
