"""Weight snapshots on the shared volume: written atomically, verified before use, pruned safely.

Layout: `<root>/snapshots/v<version>/` holds what `save_pretrained` writes (config + safetensors
shards, in the model's dtype), the tokenizer files, and `MANIFEST.json` (every file's size and
BLAKE3 digest, computed while the weights were written: weightfiles.py). The snapshot's
checksum is the sha256 of the manifest bytes, so one short string pins every byte. A snapshot is
written into a hidden temporary directory, fsynced, then renamed into place: readers see a
complete snapshot or none. A reader verifies the checksum and every file before loading; a
partial or corrupt snapshot raises SnapshotError and the caller keeps its old weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .faults import fault_point
from .storage import atomic_dir
from .weightfiles import HASH, HASHES, file_digest

MANIFEST = "MANIFEST.json"
ADAPTER_CONFIG = "adapter_config.json"  # a LoRA run's snapshot holds an adapter, not full weights (lora.py)
_VERSION_DIR = re.compile(r"^v(\d+)$")
_CHUNK = 1 << 20


class SnapshotError(RuntimeError):
    """A snapshot that must not be loaded (missing, partial, or not matching its checksum)."""


@dataclass(frozen=True)
class SnapshotInfo:
    version: int
    path: str
    checksum: str


def snapshot_dir(root: str | Path, version: int) -> Path:
    return Path(root) / "snapshots" / f"v{version}"


def _manifest_bytes(directory: Path, version: int, known: Optional[dict[str, str]] = None) -> bytes:
    """Every file's size and BLAKE3 digest; `known` digests (computed while the files were
    written, weightfiles.write_safetensors) spare reading those files back."""
    known = known or {}
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    entries = {p.name: {"size": p.stat().st_size, HASH: known.get(p.name) or file_digest(p)} for p in files}
    manifest: dict = {"version": version, "files": entries}
    if (directory / ADAPTER_CONFIG).is_file():  # says what the weights are: an adapter, and on which base
        base = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
        manifest["adapter"] = {"kind": "lora", "base": base}
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def file_matches(path: Path, entry: dict) -> bool:
    """Does the file have the size and digest its manifest entry records (BLAKE3, or sha256 in
    manifests written before BLAKE3)?"""
    algorithm = next((a for a in HASHES if a in entry), None)
    if algorithm is None or path.stat().st_size != entry["size"]:
        return False
    return file_digest(path, algorithm) == entry[algorithm]


def write_snapshot(root: str | Path, version: int, save_into, extra_files: Iterable[Path] = ()) -> SnapshotInfo:
    """Write a snapshot atomically. `save_into(tmpdir)` writes the model and may return the
    digests of the files it hashed while writing them ({name: digest}; see backends.weights)."""
    with atomic_dir(snapshot_dir(root, version)) as tmp:
        known = save_into(tmp)
        for extra in extra_files:
            if extra.is_file() and not (tmp / extra.name).exists():
                shutil.copy2(extra, tmp / extra.name)
        manifest = _manifest_bytes(tmp, version, known if isinstance(known, dict) else None)
        (tmp / MANIFEST).write_bytes(manifest)
        fault_point("snapshot-write")
    return SnapshotInfo(version, str(snapshot_dir(root, version)), hashlib.sha256(manifest).hexdigest())


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # files an engine would load weights from


def confined(path: str | Path, root: str | Path) -> Path:
    """`path` resolved, refused unless it is a snapshot directory under `<root>/snapshots`."""
    resolved, base = Path(path).resolve(), (Path(root) / "snapshots").resolve()
    if resolved.parent != base or not _VERSION_DIR.match(resolved.name):
        raise SnapshotError(f"snapshot path {path} is not a snapshot directory under {base}")
    return resolved


def _check_names(path: Path, manifest: dict) -> None:
    """Manifest names are plain file names; no weight file outside the manifest (an engine would load it)."""
    listed = set(manifest["files"])
    for name in listed:
        if not name or "/" in name or "\\" in name or name.startswith(".") or Path(name).is_absolute():
            raise SnapshotError(f"snapshot {path}: manifest entry {name!r} is not a plain file name")
    extra = sorted(p.name for p in path.iterdir() if p.name not in listed and p.suffix in WEIGHT_SUFFIXES)
    if extra:
        raise SnapshotError(f"snapshot {path}: weight files not in the manifest: {', '.join(extra)}")


def verify_snapshot(path: str | Path, checksum: str, version: Optional[int] = None) -> dict:
    """Check the manifest's checksum, its names and version, and every listed file; return the
    manifest or raise SnapshotError (a damaged manifest included)."""
    path = Path(path)
    manifest = check_structure(path, checksum, version)
    for name, entry in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise SnapshotError(f"snapshot {path}: file {name} is missing")
        if not file_matches(f, entry):
            raise SnapshotError(f"snapshot {path}: file {name} is corrupt (size or digest differs)")
    return manifest


def check_structure(path: str | Path, checksum: str, version: Optional[int] = None) -> dict:
    """Everything verify_snapshot checks but the files' digests (engines hash while they load,
    engines/verified.py): the manifest's checksum, names and version, no unlisted weight file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SnapshotError(f"snapshot {path}: no {MANIFEST} (missing or partial snapshot)")
    raw = manifest_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != checksum:
        raise SnapshotError(f"snapshot {path}: manifest checksum does not match the announcement")
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("version"), int):
            raise ValueError("no files or no version")
    except (ValueError, AttributeError) as err:
        raise SnapshotError(f"snapshot {path}: {MANIFEST} is not a valid manifest ({err})") from err
    if version is not None and manifest["version"] != version:
        raise SnapshotError(f"snapshot {path}: the manifest says version {manifest['version']}, "
                            f"the announcement {version}")
    _check_names(path, manifest)
    return manifest


def load_snapshot_state(path: str | Path) -> dict:
    """All tensors of a snapshot's safetensors files, merged (HF parameter names)."""
    from safetensors.torch import load_file

    state: dict = {}
    path = Path(path)
    if (path / MANIFEST).is_file():  # only what the manifest lists (verify_snapshot checked it)
        files = sorted(path / n for n in json.loads((path / MANIFEST).read_text())["files"] if n.endswith(".safetensors"))
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SnapshotError(f"snapshot {path}: no .safetensors files")
    for f in files:
        state.update(load_file(str(f)))
    return state


def snapshot_summary(root: str | Path) -> dict:
    """What the newest snapshot under `root` (a volume) weighs, from its manifest: the weight files'
    bytes (what generators load: the adapter alone in a LoRA run) and every file's; {} when none."""
    versions = list_versions(root)
    manifest_path = snapshot_dir(root, versions[-1]) / MANIFEST if versions else None
    if manifest_path is None or not manifest_path.is_file():
        return {}
    manifest = json.loads(manifest_path.read_text())
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    return {"snapshot_kind": "adapter" if "adapter" in manifest else "full",
            "snapshot_weight_bytes": sum(n for name, n in sizes.items() if name.endswith(WEIGHT_SUFFIXES)),
            "snapshot_bytes": sum(sizes.values())}


def version_of(path: str | Path) -> int:
    """The version of a snapshot directory (`.../snapshots/v<version>`)."""
    m = _VERSION_DIR.match(Path(path).name)
    if not m:
        raise SnapshotError(f"{path} is not a snapshot directory (expected a name like v12)")
    return int(m.group(1))


def list_versions(root: str | Path) -> list[int]:
    base = Path(root) / "snapshots"
    if not base.is_dir():
        return []
    return sorted(int(m.group(1)) for p in base.iterdir() if (m := _VERSION_DIR.match(p.name)))


def prune_snapshots(root: str | Path, keep: int, in_use: Iterable[int] = ()) -> list[int]:
    """Delete all but the newest `keep` snapshots, sparing any version still in use."""
    versions = list_versions(root)
    protected = set(versions[-keep:]) | set(in_use)
    removed = [v for v in versions if v not in protected]
    for v in removed:
        shutil.rmtree(snapshot_dir(root, v), ignore_errors=True)
    return removed
