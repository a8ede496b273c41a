"""LoRA snapshot size: adapter vs full weights, measured side by side in one run.

Measured (files written through the learner's own code, `write_snapshot` with TorchBackend's
writers): the built-in tiny model and a random-initialised ~374M Llama (bench/weight_sync_bench.py's
config; nothing downloaded), each written once as full weights and once as a rank-16 adapter on
every linear layer, in bf16 (what a GPU run publishes) — the weight files' bytes and the ratio.
Counted (a model built on PyTorch's meta device: exact parameter counts, no memory): the public
configs of Llama 3.2 1B, Llama 3.1 8B and 70B — adapter parameters and bytes per snapshot against
full weights, and the learner's training state (weights + gradients + AdamW) with and without LoRA.

    python bench/lora_size_bench.py            # writes bench/results/lora_size.{md,json}
    python bench/lora_size_bench.py --quick    # the tiny model and the 1B count only (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workloads"))

from asyncrlhf.backends.weights import save_snapshot_files  # noqa: E402
from asyncrlhf.lora import save_adapter_files, trainable_parameters, wrap_policy  # noqa: E402
from asyncrlhf.models import load_causal_lm, resolve_model  # noqa: E402
from asyncrlhf.snapshots import snapshot_summary, write_snapshot  # noqa: E402
from asyncrlhf.spec.lora import LoraSpec  # noqa: E402

RANK, ALPHA, DTYPE = 16, 32.0, "bfloat16"
LLAMA_374M = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512, tie_word_embeddings=False)
PUBLIC = {  # the published configs' shapes
    "Llama-3.2-1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "Llama-3.1-70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
GIB = 1 << 30


def spec() -> LoraSpec:
    return LoraSpec(enabled=True, rank=RANK, alpha=ALPHA)


def measure(name: str, model) -> dict:
    """Write `model` as a full snapshot and as an adapter snapshot; their weight files' bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        write_snapshot(Path(tmp) / "full", 1, lambda d: save_snapshot_files(model, d, DTYPE))
        full = snapshot_summary(Path(tmp) / "full")["snapshot_weight_bytes"]
        wrapped = wrap_policy(model, spec())
        write_snapshot(Path(tmp) / "adapter", 1, lambda d: save_adapter_files(wrapped, d, DTYPE))
        adapter = snapshot_summary(Path(tmp) / "adapter")
    assert adapter["snapshot_kind"] == "adapter"
    params = sum(p.numel() for p in trainable_parameters(wrapped))
    return {"model": name, "parameters": sum(p.numel() for p in wrapped.parameters()) - params,
            "adapter_parameters": params, "full_bytes": full, "adapter_bytes": adapter["snapshot_weight_bytes"],
            "ratio": round(full / adapter["snapshot_weight_bytes"], 1)}


def count(name: str, shape: dict) -> dict:
    """Exact counts from a model on the meta device, and the bytes they imply (bf16 snapshots; the
    learner's state: fp32 masters, gradients and AdamW moments of what trains, plus the frozen base in bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        wrapped = wrap_policy(LlamaForCausalLM(LlamaConfig(**shape)), spec())
    adapter = sum(p.numel() for p in trainable_parameters(wrapped))
    base = sum(p.numel() for p in wrapped.parameters()) - adapter
    return {"model": name, "parameters": base, "adapter_parameters": adapter,
            "full_bytes": base * 2, "adapter_bytes": adapter * 2, "ratio": round(base / adapter, 1),
            # full: fp32 master + grad + 2 moments (16 B) + the bf16 reference (2 B); LoRA: bf16 base + 16 B per adapter param
            "learner_state_full_gib": round(base * 18 / GIB, 1),
            "learner_state_lora_gib": round((base * 2 + adapter * 16) / GIB, 1)}


def render(measured: list[dict], counted: list[dict]) -> str:
    lines = [f"# LoRA snapshots: adapter vs full weights (rank {RANK}, all-linear, {DTYPE})", "",
             "Measured (files written by the learner's writers, this machine):", "",
             "| model | parameters | adapter parameters | full snapshot | adapter snapshot | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['adapter_parameters']:,} | {r['full_bytes']:,} B | "
              f"{r['adapter_bytes']:,} B | {r['ratio']}x |" for r in measured]
    lines += ["", "Counted (public configs on the meta device; bytes = parameters x 2):", "",
              "| model | parameters | adapter parameters | full snapshot | adapter snapshot | ratio | learner state full | learner state LoRA |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {r['adapter_parameters'] / 1e6:.1f} M | "
              f"{r['full_bytes'] / 1e9:.2f} GB | {r['adapter_bytes'] / 1e6:.1f} MB | {r['ratio']}x | "
              f"{r['learner_state_full_gib']} GiB | {r['learner_state_lora_gib']} GiB |" for r in counted]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model and the 1B count only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where lora_size.{md,json} go")
    args = parser.parse_args()
    torch.manual_seed(0)
    measured = [measure("tiny-sort (built-in)", load_causal_lm(resolve_model("builtin:tiny-sort")))]
    if not args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        measured.append(measure("Llama ~374M (random init)", LlamaForCausalLM(LlamaConfig(**LLAMA_374M))))
    counted = [count(name, shape) for name, shape in PUBLIC.items() if not args.quick or name == "Llama-3.2-1B"]
    text = render(measured, counted)
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lora_size.md").write_text(text)
        (out / "lora_size.json").write_text(json.dumps({"measured": measured, "counted": counted}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
