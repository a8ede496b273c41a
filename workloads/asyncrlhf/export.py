"""Taking the trained model away: `asyncrlhf export RUN_DIR_OR_SNAPSHOT OUT_DIR`, and what makes a
snapshot a complete Hugging Face model directory.

A snapshot (`<volume>/snapshots/v<step>/`) is what `save_pretrained` writes — config.json,
generation_config.json, safetensors — plus the tokenizer's files as the learner saved them with
`tokenizer.save_pretrained` (tokenizer.json, tokenizer_config.json, special tokens, and the chat
template as chat_template.jinja), plus MANIFEST.json (every file's size and hash). The policy after
the last step is the snapshot of version `learner.totalSteps`: `export` picks the newest snapshot
of a run (or the one `--version` names), verifies every file against its manifest, and writes a
directory that `transformers.AutoModelForCausalLM.from_pretrained`, `AutoTokenizer` and vLLM load:
the snapshot's files without the manifest, and what an older snapshot lacks (tokenizer files,
generation config) filled in from the job's model. The copy is written into a temporary directory
and renamed into place, so OUT_DIR is complete or absent.

A LoRA run's snapshots hold an adapter (adapter_config.json + adapter_model.safetensors, lora.py):
`export` writes the adapter (and the tokenizer), which `peft.PeftModel.from_pretrained(base, OUT_DIR)`
and vLLM (`LoRARequest`) load on the base; `--merge` folds it into the base's weights and writes a
plain model directory instead. The base is `--base`, else the job's model.policy, else the base the
adapter names.

Why the learner saves the tokenizer itself (`snapshot_tokenizer`): a hub-id policy has no files
on disk to copy, and the template training used must travel with the weights — an inline
`model.chatTemplate` is set on the tokenizer before it is saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .api import JobSpec
from .lora import adapter_base, is_adapter, merged_model
from .manifest import ManifestError, load_manifest
from .models import AUTO_TEMPLATE, NO_TEMPLATE, load_tokenizer, resolve_model
from .snapshots import MANIFEST, SnapshotError, list_versions, snapshot_dir, verify_snapshot
from .storage import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # any one will do
JOB_FILE = "job.yaml"  # where `asyncrlhf run` keeps the job's manifest in the run directory


class ExportError(ValueError):
    """The source cannot be exported (no snapshot, a corrupt one, an existing output directory)."""


# --- what the learner writes into every snapshot ---------------------------------------------------

def snapshot_tokenizer(spec: JobSpec, policy_path: str):
    """The tokenizer a snapshot carries: the job's (model.tokenizer, else the policy's), with an
    inline model.chatTemplate set as its chat template."""
    tokenizer = load_tokenizer(resolve_model(spec.model.tokenizer) if spec.model.tokenizer else policy_path)
    if spec.model.chat_template not in (AUTO_TEMPLATE, NO_TEMPLATE):  # an inline Jinja template
        tokenizer.chat_template = spec.model.chat_template
    return tokenizer


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


# --- finding the snapshot --------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    snapshot: Path  # the snapshot directory exported
    job: Optional[Path]  # the job's manifest, when one is found beside it (fills in missing files)


def find_snapshot(path: str | Path, version: Optional[int] = None) -> Source:
    """A snapshot directory as it is, or the newest snapshot (or `version`) of a run directory
    (`asyncrlhf run`: runs/<job>/), of a volume (`<volume>/snapshots/`) or of a cluster run's report
    directory (`<volume>/report`)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such directory (give a run directory or a snapshot directory)")
    if (path / MANIFEST).is_file() or (path / "config.json").is_file():
        return Source(path, _job_near(path))
    for root in (path, path / "volume", path.parent):
        if (root / "snapshots").is_dir():
            versions = list_versions(root)
            if not versions:
                break
            if version is None:
                version = versions[-1]
            elif version not in versions:
                raise ExportError(f"{root / 'snapshots'} has no snapshot v{version} (it has {_listed(versions)})")
            return Source(snapshot_dir(root, version), _job_near(path))
    raise ExportError(f"{path}: no snapshots found (a run directory holds volume/snapshots/v<step>/; a volume "
                      "holds snapshots/v<step>/; or give a snapshot directory itself)")


def _job_near(path: Path) -> Optional[Path]:
    for candidate in (path, *path.parents[:4]):
        if (candidate / JOB_FILE).is_file():
            return candidate / JOB_FILE
    return None


def _listed(versions: list[int]) -> str:
    shown = versions if len(versions) <= 6 else versions[:3] + ["..."] + versions[-2:]
    return ", ".join(f"v{v}" if isinstance(v, int) else v for v in shown)


# --- exporting -------------------------------------------------------------------------------------

def verify(snapshot: Path) -> None:
    """Every file against the snapshot's manifest (a snapshot without one is taken as it is)."""
    manifest = snapshot / MANIFEST
    if manifest.is_file():
        try:
            verify_snapshot(snapshot, hashlib.sha256(manifest.read_bytes()).hexdigest())
        except SnapshotError as err:
            raise ExportError(f"refusing to export: {err}") from err


def export(source: str | Path, out_dir: str | Path, *, version: Optional[int] = None,
           tokenizer: str = "", merge: bool = False, base: str = "") -> Path:
    """Write the HF model directory of a run's newest snapshot (or `version`) to `out_dir`; a LoRA
    snapshot's adapter, or with `merge` the base model with the adapter folded in."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose a new directory (nothing is overwritten)")
    found = find_snapshot(source, version)
    verify(found.snapshot)
    if is_adapter(found.snapshot):
        return _export_adapter(found, out, tokenizer, merge, base)
    if merge:
        raise ExportError(f"{found.snapshot} holds full weights, not a LoRA adapter: nothing to merge (drop --merge)")
    if not list(found.snapshot.glob("*.safetensors")) or not (found.snapshot / "config.json").is_file():
        raise ExportError(f"{found.snapshot}: no config.json or .safetensors weights: not a model snapshot")
    if out.exists():
        out.rmdir()
    with atomic_dir(out) as tmp:
        for f in sorted(found.snapshot.iterdir()):
            if f.is_file() and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        _complete(tmp, found, tokenizer)
    return out


def _export_adapter(found: Source, out: Path, tokenizer: str, merge: bool, base: str) -> Path:
    """The adapter as it is (plus the tokenizer), or merged into its base (a plain model directory)."""
    spec = _job_spec(found)
    if out.exists():
        out.rmdir()
    with atomic_dir(out) as tmp:
        if merge:
            base = base or (resolve_model(spec.model.policy) if spec is not None else adapter_base(found.snapshot))
            if not base:
                raise ExportError(f"{found.snapshot}: the adapter names no base model: pass --base (a path or hub id)")
            dtype = spec.model.dtype if spec is not None else "float32"
            merged_model(base, found.snapshot, dtype).save_pretrained(tmp)
        for f in sorted(found.snapshot.iterdir()):
            if f.is_file() and f.name != MANIFEST and not (merge and f.name.startswith("adapter_")):
                shutil.copy2(f, tmp / f.name)
        _complete(tmp, found, tokenizer, generation_config=merge)
    return out


def _complete(directory: Path, found: Source, tokenizer: str, generation_config: bool = True) -> None:
    """Fill in what an older snapshot (or one of a hub-id policy) lacks: tokenizer, generation config."""
    if tokenizer:
        load_tokenizer(tokenizer).save_pretrained(directory)
    elif not has_tokenizer(directory):
        spec = _job_spec(found)
        if spec is None:
            raise ExportError(
                f"{found.snapshot} has no tokenizer files and no job manifest ({JOB_FILE}) is beside it: "
                "pass --tokenizer with the policy's tokenizer (a path or hub id)")
        snapshot_tokenizer(spec, resolve_model(spec.model.policy)).save_pretrained(directory)
    if generation_config and not (directory / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(directory)).save_pretrained(directory)


def _job_spec(found: Source) -> Optional[JobSpec]:
    if found.job is None:
        return None
    try:
        return load_manifest(str(found.job)).spec
    except ManifestError as err:
        raise ExportError(str(err)) from err


def describe(out: Path) -> dict:
    """What was written, for the command's output."""
    files = sorted(p.name for p in out.iterdir())
    return {"directory": str(out), "files": files,
            "bytes": sum((out / f).stat().st_size for f in files),
            "chat_template": (out / "chat_template.jinja").is_file() or _template_in_config(out)}


def _template_in_config(out: Path) -> bool:
    config = out / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def adapter_hint(out: Path) -> str:
    """How to load an exported LoRA adapter ("" for a full model directory)."""
    if not is_adapter(out):
        return ""
    base = adapter_base(out) or "BASE"
    return (f"a LoRA adapter on {base}: peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
            f"{str(out)!r}), or vLLM with enable_lora and LoRARequest('adapter', 1, {str(out)!r}); "
            "`asyncrlhf export ... --merge` writes the merged model instead")
