"""Optimizer state as files without pickle: safetensors for the tensors, JSON for the structure.

Why its own module: both backends write and read the same files (a checkpoint resumes on any
number of ranks and either backend), so the format has one home.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..weightfiles import write_safetensors

MASTER_WEIGHTS = "master.safetensors"  # fp32 master weights, when training in bf16/fp16 (snapshots are in that dtype)


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (structure): no pickle."""
    save_optimizer_state(optimizer.state_dict(), directory)


def save_optimizer_state(state: dict, directory: Path) -> None:
    """A torch optimizer `state_dict()` (or one built like it) as optimizer.safetensors + optimizer.json."""
    tensors, layout = {}, {}
    for pid, entries in state["state"].items():
        layout[str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous()
                layout[str(pid)][name] = {"tensor": True}
            else:
                layout[str(pid)][name] = {"value": value}
    # streamed tensor by tensor (weightfiles): safetensors' save_file first builds the whole file in memory
    write_safetensors(directory / "optimizer.safetensors", sorted(tensors.items()))
    (directory / "optimizer.json").write_text(json.dumps({"state": layout, "param_groups": state["param_groups"]}))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    optimizer.load_state_dict(read_optimizer_state(directory))


def read_optimizer_state(directory: Path) -> dict:
    """The `state_dict()` that save_optimizer_state wrote."""
    meta = json.loads((directory / "optimizer.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state = {
        int(pid): {
            name: tensors[f"{pid}.{name}"] if entry.get("tensor") else entry["value"]
            for name, entry in entries.items()
        }
        for pid, entries in meta["state"].items()
    }
    return {"state": state, "param_groups": meta["param_groups"]}
