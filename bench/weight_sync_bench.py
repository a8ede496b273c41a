"""Weight sync at model scale, measured side by side in one run (issue 11's targets).

A random-initialised Llama of ~374M parameters is built here (nothing downloaded). Measured, each
pair in alternating order with `sync` and a pause between timed operations (fsynced writes here
are order-sensitive, see PLATFORM.md), page cache dropped (posix_fadvise) before every cold read:

  1. snapshot write (the learner's path: bf16 weights streamed, BLAKE3 while written, manifest,
     fsync, rename) vs a raw fsynced write of the same bytes; the same from fp32 masters cast on
     this CPU as they stream (a GPU learner casts on the device); and the old path (save_pretrained,
     then sha256 of every file) for reference;
  2. generator verify + reload vs a raw read of the same bytes, cold: the HF engine (one read:
     hashed as read) and vLLM's CPU engine (hashed on a thread while vLLM reads), each also the
     old way (verify_snapshot, then reload: two reads);
  3. a checkpoint (AdamW moments + fp32 masters) vs a snapshot;
  4. the learner's stall per publish over one checkpoint interval at its default
     (sizing.checkpoint_every_steps), against the raw snapshot write.

    python bench/weight_sync_bench.py [--dir DIR] [--rounds 2] [--no-vllm] [--publishes N]

Results: bench/results/weight_sync.md (written by this script, with the command).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "workloads"), str(REPO / "operator")]

from asyncrlhf.api import JobSpec  # noqa: E402
from asyncrlhf.backends.optim_state import MASTER_WEIGHTS, save_optimizer  # noqa: E402
from asyncrlhf.backends.weights import save_snapshot_files  # noqa: E402
from asyncrlhf.checkpoints import CheckpointStore, LearnerState  # noqa: E402
from asyncrlhf.sizing import checkpoint_every_steps, snapshot_bytes  # noqa: E402
from asyncrlhf.snapshots import prune_snapshots, verify_snapshot, write_snapshot  # noqa: E402
from asyncrlhf.storage import fsync_dir  # noqa: E402

PAUSE = 3.0
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512, tie_word_embeddings=False)


def settle() -> None:
    os.sync()
    time.sleep(PAUSE)


def drop_cache(directory: Path) -> None:
    """Evict a directory's (clean, fsynced) pages from the page cache: the next read is from disk."""
    for f in directory.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_write(path: Path, data: bytes) -> None:
    with open(path, "wb", buffering=0) as out:
        view = memoryview(data)
        while view:
            view = view[out.write(view[: 16 << 20]):]
        os.fsync(out.fileno())
    fsync_dir(path.parent)


def raw_read(directory: Path) -> int:
    n = 0
    for f in sorted(directory.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as handle:
                buf = bytearray(os.path.getsize(f))
                n += handle.readinto(buf)
    return n


def old_snapshot(model, root: Path, version: int) -> str:
    """The path before this issue: save_pretrained in the model's dtype, then sha256 of every file."""
    import hashlib

    from asyncrlhf import snapshots

    def save_into(d: Path) -> None:
        model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
        model.to(torch.float32)

    manifest_bytes = snapshots._manifest_bytes

    def sha256_manifest(directory, version, known=None):
        files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != snapshots.MANIFEST)
        entries = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                   for p in files}
        return json.dumps({"version": version, "files": entries}, indent=1, sort_keys=True).encode()

    snapshots._manifest_bytes = sha256_manifest
    try:
        return write_snapshot(root, version, save_into).path
    finally:
        snapshots._manifest_bytes = manifest_bytes


def pairs(rounds: int, a, b) -> tuple[list[float], list[float]]:
    """Time a() and b() `rounds` times each, alternating which goes first, settled between."""
    ta, tb = [], []
    for r in range(rounds):
        for which in ((a, b) if r % 2 == 0 else (b, a)):
            settle()
            (ta if which is a else tb).append(which())
    return ta, tb


def bench_writes(model, weights, root: Path, rounds: int) -> dict:
    """`weights`: the policy already in bf16 (a GPU learner casts on the device, then streams);
    `model`: fp32 masters, cast on this CPU as they are streamed."""
    version = iter(range(1, 1000))

    def snapshot(m) -> float:
        v = next(version)
        t = timed(lambda: write_snapshot(root, v, lambda d: save_snapshot_files(m, d, "bfloat16")))
        prune_snapshots(root, 1)
        return t

    first = write_snapshot(root, 0, lambda d: save_snapshot_files(weights, d, "bfloat16"))
    data = (Path(first.path) / "model.safetensors").read_bytes()
    raw = root / "raw.bin"
    cases = {"snapshot": lambda: snapshot(weights), "raw_write": lambda: timed(lambda: raw_write(raw, data)),
             "snapshot_from_fp32_masters": lambda: snapshot(model)}
    out: dict = {name: [] for name in cases}
    for r in range(rounds):
        names = list(cases)[r % 3:] + list(cases)[: r % 3]  # each goes first once in three rounds
        for name in names:
            settle()
            out[name].append(cases[name]())
    settle()
    out["old_snapshot"] = timed(lambda: old_snapshot(model, root / "old", 1))
    raw.unlink()
    return {"bytes": len(data)} | out


def bench_reads(snapshot, engines: dict, rounds: int) -> dict:
    path = Path(snapshot.path)
    out = {"raw_read": []}
    cases = {"raw_read": lambda: raw_read(path)}
    for name, engine in engines.items():
        cases[f"{name}_one_pass"] = lambda e=engine: e.reload(str(path), snapshot.checksum)
        cases[f"{name}_verify_then_reload"] = lambda e=engine: (verify_snapshot(path, snapshot.checksum),
                                                                 e.reload(str(path)))
    for r in range(rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            settle()
            drop_cache(path)
            out.setdefault(name, []).append(timed(cases[name]))
    return out


def bench_checkpoint_and_publishes(model, weights, root: Path, publishes: int, spec: JobSpec) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments
    for p in model.parameters():
        p.grad = None
    gc.collect()
    store = CheckpointStore(root)

    def write_into(d: Path) -> None:  # TorchBackend.save_state in bf16: moments + fp32 masters
        save_optimizer(optimizer, d)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / MASTER_WEIGHTS))

    every = checkpoint_every_steps(spec, sum(p.numel() for p in model.parameters()))
    n = publishes or every
    stalls, ckpt = [], None
    settle()
    for step in range(1, n + 1):
        start = time.perf_counter()
        info = write_snapshot(root, step, lambda d: save_snapshot_files(weights, d, "bfloat16"))
        if step % every == 0 or step == n:
            t0 = time.perf_counter()
            store.save(LearnerState(step=step), info, write_into)
            ckpt = time.perf_counter() - t0
        stalls.append(time.perf_counter() - start)
        prune_snapshots(root, 2, {info.version})
    settle()
    snap_only = timed(lambda: write_snapshot(root, 10_000, lambda d: save_snapshot_files(weights, d, "bfloat16")))
    return {"checkpoint_every_steps": every, "publishes": n, "stalls": stalls, "checkpoint": ckpt,
            "snapshot_alone": snap_only, "checkpoint_bytes": sum(
                f.stat().st_size for f in store.directory(n).iterdir())}


def make_engines(model_dir: Path, vllm: bool) -> dict:
    from asyncrlhf.engines.hf import HFEngine

    hf_spec = JobSpec.model_validate({"model": {"dtype": "bfloat16"}, "generator": {"engine": "hf"}})
    engines = {"hf": HFEngine(hf_spec, str(model_dir))}
    if vllm:
        from asyncrlhf.engines.vllm_engine import VLLMEngine

        spec = JobSpec.model_validate({"model": {"dtype": "bfloat16"},
                                       "generator": {"engine": "vllm", "kvCacheGiB": 0.25}})
        engines["vllm"] = VLLMEngine(spec, str(model_dir))
    return engines


def build_model(directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from asyncrlhf.models import build_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).float()
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    model.float()
    build_tokenizer().save_pretrained(directory)
    return model


def render(r: dict) -> str:
    """bench/results/weight_sync.md from the measurements (means over the rounds)."""
    mean = statistics.mean
    w, rd, pub = r["writes"], r["reads"], r["publish"]
    raw_w, raw_r = mean(w["raw_write"]), mean(rd["raw_read"])
    gb = w["bytes"] / 1e9
    stall = mean(pub["stalls"])
    lines = [
        "# Weight sync at model scale (bench/weight_sync_bench.py)", "",
        f"Command: `{r['command']}` — one run, this machine (2 shared cores, the shared disk). Random-initialised "
        f"Llama, {r['parameters'] / 1e6:.0f}M parameters; snapshots in bf16 ({gb:.2f} GB). Each pair timed in "
        "alternating order with `sync` and a 3 s pause between; reads cold (page cache dropped with "
        "posix_fadvise). Times in seconds, means over the rounds (every round in weight_sync.json).", "",
        "| measurement | seconds | vs baseline | target |", "|---|---:|---:|---|",
        f"| raw fsynced write of the snapshot's bytes (baseline) | {raw_w:.2f} | 1.00 | |",
        f"| snapshot write from bf16 weights (stream + BLAKE3 while writing + manifest + fsync + rename) "
        f"| {mean(w['snapshot']):.2f} | {mean(w['snapshot']) / raw_w:.2f} | ≤ 1.3 |",
        f"| snapshot write from fp32 masters (+ the fp32→bf16 cast on this CPU) "
        f"| {mean(w['snapshot_from_fp32_masters']):.2f} | {mean(w['snapshot_from_fp32_masters']) / raw_w:.2f} | |",
        f"| old snapshot write (save_pretrained, then sha256 of every file) | {w['old_snapshot']:.2f} "
        f"| {w['old_snapshot'] / raw_w:.2f} | |",
        f"| raw read of the snapshot's bytes, cold (baseline) | {raw_r:.2f} | 1.00 | |",
    ]
    for name in ("hf", "vllm"):
        if f"{name}_one_pass" in rd:
            one, two = mean(rd[f"{name}_one_pass"]), mean(rd[f"{name}_verify_then_reload"])
            lines.append(f"| {name}: verify + reload, one read (hashed while read) | {one:.2f} | {one / raw_r:.2f} | ≤ 1.5 |")
            lines.append(f"| {name}: verify_snapshot, then reload (two reads) | {two:.2f} | {two / raw_r:.2f} | |")
    ck = pub["checkpoint"]
    lines += [
        f"| checkpoint (AdamW moments + fp32 masters, {pub['checkpoint_bytes'] / 1e9:.2f} GB) | {ck:.2f} "
        f"| {ck / pub['snapshot_alone']:.2f} × snapshot | |",
        f"| learner stall per publish, checkpointEverySteps at its default ({pub['checkpoint_every_steps']}), mean "
        f"of {pub['publishes']} publishes | {stall:.2f} | {stall / raw_w:.2f} × raw write | ≤ 1.3 |",
        f"| learner stall per publish, checkpoint with every snapshot (before) | {pub['snapshot_alone'] + ck:.2f} "
        f"| {(pub['snapshot_alone'] + ck) / raw_w:.2f} × raw write | |", "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="", help="where to write (default: a temporary directory in runs/)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--publishes", type=int, default=0, help="publishes to time (default: one checkpoint interval)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "weight_sync.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    base = Path(args.dir or tempfile.mkdtemp(prefix="weight-sync-", dir=REPO / "runs"))
    base.mkdir(parents=True, exist_ok=True)
    model = build_model(base / "model")
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, bf16 snapshot {snapshot_bytes(params, 'bfloat16') / 1e9:.2f} GB",
          flush=True)
    results = {"parameters": params, "command": " ".join(["python", "bench/weight_sync_bench.py", *sys.argv[1:]])}
    weights = copy.deepcopy(model).to(torch.bfloat16)
    results["writes"] = bench_writes(model, weights, base / "w", args.rounds)
    print(json.dumps(results["writes"]), flush=True)
    snapshot = write_snapshot(base / "r", 1, lambda d: save_snapshot_files(weights, d, "bfloat16"))
    engines = make_engines(base / "model", not args.no_vllm)
    results["reads"] = bench_reads(snapshot, engines, args.rounds)
    print(json.dumps(results["reads"]), flush=True)
    for e in engines.values():
        e.close()
    del engines
    gc.collect()
    spec = JobSpec.model_validate({"model": {"dtype": "bfloat16"}})
    results["publish"] = bench_checkpoint_and_publishes(model, weights, base / "p", args.publishes, spec)
    print(json.dumps(results["publish"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).with_suffix(".md").write_text(render(results))
    print(render(results))
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
