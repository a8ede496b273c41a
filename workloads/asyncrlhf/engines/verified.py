"""Verify a snapshot while loading it, so a generator reads its bytes once, not twice.

`snapshots.verify_snapshot` then a load reads every byte twice (hash, then load). Two ways round it:
  * the HF engine loads from memory: `load_verified_state` reads each weight file once, hashing it
    as it is read (weightfiles.read_hashed), and makes the tensors as views of those bytes; the
    other files (config, tokenizer: small) are checked by hashing them. Nothing is handed to the
    model before every file matched.
  * vLLM reads the files itself (`reload_weights`), so `verify_during` hashes them on a thread
    while the engine loads (the second reader is served from the page cache) and, when a file does
    not match, loads the previous weights back before raising: the load costs max(hash, load)
    instead of their sum, and a corrupt snapshot is never generated with.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from ..snapshots import MANIFEST, SnapshotError, file_matches, verify_snapshot
from ..weightfiles import HASHES, read_hashed, tensors_from_buffer


def manifest_of(path: Path, checksum: str) -> dict:
    """The snapshot's manifest, checked against the announced checksum."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise SnapshotError(f"snapshot {path}: no {MANIFEST} (missing or partial snapshot)")
    raw = manifest_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != checksum:
        raise SnapshotError(f"snapshot {path}: manifest checksum does not match the announcement")
    return json.loads(raw)


def _member(path: Path, name: str) -> Path:
    if Path(name).name != name or name.startswith("."):
        raise SnapshotError(f"snapshot {path}: manifest names {name!r}, which is not a file of the snapshot")
    return path / name


def load_verified_state(path: str | Path, checksum: str) -> dict[str, torch.Tensor]:
    """All tensors of a snapshot's safetensors files (those its manifest lists), each file read
    once and checked against its digest; raises SnapshotError before returning anything."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for name, entry in manifest_of(path, checksum)["files"].items():
        f = _member(path, name)
        if not f.is_file():
            raise SnapshotError(f"snapshot {path}: file {name} is missing")
        algorithm = next((a for a in HASHES if a in entry), None)
        if not name.endswith(".safetensors") or algorithm is None:
            if not file_matches(f, entry):
                raise SnapshotError(f"snapshot {path}: file {name} is corrupt (size or digest differs)")
            continue
        buf, digest = read_hashed(f, algorithm)
        if len(buf) != entry["size"] or digest != entry[algorithm]:
            raise SnapshotError(f"snapshot {path}: file {name} is corrupt (size or digest differs)")
        state.update(tensors_from_buffer(buf))
    if not state:
        raise SnapshotError(f"snapshot {path}: no .safetensors files")
    return state


def verify_during(path: str | Path, checksum: str, load: Callable[[], None], restore: Callable[[], None]) -> None:
    """Run `load()` while the snapshot is verified on a thread; if verification fails, `restore()`
    (the previous weights) and raise SnapshotError."""
    failure: list[Optional[BaseException]] = [None]

    def verify() -> None:
        try:
            verify_snapshot(path, checksum)
        except (SnapshotError, OSError) as err:
            failure[0] = err

    thread = threading.Thread(target=verify, name="verify-snapshot", daemon=True)
    thread.start()
    try:
        load()
    except Exception:
        thread.join()
        restore()  # a load that failed half-way leaves mixed weights
        if failure[0] is not None:  # the engine choked on a corrupt file: say why
            raise SnapshotError(str(failure[0])) from failure[0]
        raise
    thread.join()
    if failure[0] is not None:
        restore()
        raise SnapshotError(str(failure[0])) from failure[0]
