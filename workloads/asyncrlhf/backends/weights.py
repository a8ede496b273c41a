"""A snapshot's files from a model in memory: config + safetensors in the model's dtype, hashed as written.

Why not `save_pretrained`: it hashes nothing, so the manifest had to read every byte back; and a
learner training with fp32 master weights must publish them in the model's dtype (bf16 on GPUs:
half the bytes to write, and what generators load). `save_snapshot_files` writes what transformers
and vLLM read (`config.json`, `generation_config.json`, `model.safetensors` or shards with
`model.safetensors.index.json`) and returns each weight file's digest for the manifest.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch

from ..weightfiles import shard, write_safetensors

MAX_SHARD_BYTES = 5 << 30  # transformers' default shard size: files a loader can read in parallel


def save_snapshot_files(model, directory: Path, dtype: str, state: Optional[dict[str, torch.Tensor]] = None,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, str]:
    """Write `model` (or `state`, e.g. ZeRO-3's gathered weights, with `model`'s config) into
    `directory` in `dtype`; {file name: digest} of the weight files."""
    directory = Path(directory)
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # what loaders use by default ("auto")
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    target = getattr(torch, dtype)
    tensors = list((state if state is not None else model.state_dict()).items())
    shards = shard(tensors, max_shard_bytes, target.itemsize)
    if len(shards) == 1:
        return {"model.safetensors": write_safetensors(directory / "model.safetensors", shards[0], target)}
    digests, weight_map = {}, {}
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        digests[name] = write_safetensors(directory / name, part, target)
        weight_map |= {key: name for key, _ in part}
    total = sum(t.numel() * (target.itemsize if t.is_floating_point() else t.element_size()) for _, t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return digests
