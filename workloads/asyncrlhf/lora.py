"""LoRA (spec.learner.lora): the adapter the learner trains, the files a snapshot carries, and how
engines and export put it back on its base.

Why adapters change weight sync: a rank-16 adapter on every linear layer of an 8B model is ~42M
parameters (84 MB in bf16) against 16 GB of full weights, so a snapshot, its hashing, the
generators' reload and a checkpoint (AdamW moments of trainable parameters only) shrink by the
same factor. The snapshot holds what PEFT's `save_pretrained` writes — `adapter_config.json` and
`adapter_model.safetensors` (PEFT's key names, which vLLM's LoRA loader and `PeftModel` read) —
written with weightfiles.write_safetensors so its digest is computed as it is written, plus the
tokenizer. Its manifest says `"adapter": {"base": ...}` (snapshots.py).

The reference model of a LoRA run is the base itself: the policy with its adapter switched off
(`disable_adapter()`), so no second copy of the model is loaded.

Applying an adapter: the HF engine and the evaluator wrap their base model with PEFT once and load
each new adapter's tensors into it (`apply_adapter`); vLLM loads the adapter directory itself
(LoRARequest, engines/vllm_engine.py); `asyncrlhf export --merge` folds it into the base weights
(`merged_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .snapshots import ADAPTER_CONFIG
from .spec.lora import ALL_LINEAR, LoraSpec
from .weightfiles import write_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_LORA_KEY = ".lora_"  # every tensor an adapter holds (lora_A, lora_B)


class AdapterError(ValueError):
    """An adapter that does not fit the model it is applied to."""


def lora_config(spec: LoraSpec, base: str = ""):
    """PEFT's LoraConfig for the spec (a causal LM; `base` is recorded as base_model_name_or_path)."""
    from peft import LoraConfig

    targets = ALL_LINEAR if spec.target_modules == [ALL_LINEAR] else list(spec.target_modules)
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base or None)


def wrap_policy(model, spec: LoraSpec, base: str = ""):
    """The policy with a fresh adapter (B = 0: the same function as the base); only the adapter trains."""
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, lora_config(spec, base))
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise AdapterError(f"learner.lora.targetModules {spec.target_modules}: {err} (name modules of the "
                           "policy, e.g. q_proj, v_proj, or use 'all-linear')") from err
    return wrapped


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved names (base_model.model.<module>.lora_A.weight)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def load_adapter_state(model, state: dict[str, torch.Tensor], where: str = "") -> None:
    """Set the adapter's tensors; refused unless `state` has exactly the adapter's tensors."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AdapterError(f"adapter {where or '(in memory)'} does not fit the model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]} (a snapshot of another job, or another learner.lora?)")
    set_peft_model_state_dict(model, state)


def save_adapter_files(model, directory: Path, dtype: str) -> dict[str, str]:
    """adapter_config.json + adapter_model.safetensors (in `dtype`); {file name: digest} of the weights."""
    directory = Path(directory)
    model.peft_config["default"].save_pretrained(str(directory))
    target = getattr(torch, dtype)
    return {ADAPTER_WEIGHTS: write_safetensors(directory / ADAPTER_WEIGHTS, sorted(adapter_state(model).items()), target)}


def is_adapter(directory: str | Path) -> bool:
    """Does the snapshot (or export) directory hold an adapter rather than full weights?"""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def adapter_base(directory: str | Path) -> str:
    """The base model an adapter directory names (base_model_name_or_path)."""
    return json.loads((Path(directory) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""


def apply_adapter(model, directory: str | Path, state: Optional[dict[str, torch.Tensor]] = None):
    """`model` with the adapter of `directory` applied (wrapped with PEFT the first time, later adapters
    loaded into the same wrapper); `state` = the adapter's tensors already read (and verified)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    directory = Path(directory)
    if state is None:
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    if not is_peft(model):
        config = LoraConfig.from_pretrained(str(directory))
        config.inference_mode = True
        model = get_peft_model(model, config)
        model.eval()
    device = next(model.parameters()).device
    load_adapter_state(model, {k: v.to(device) for k, v in state.items()}, str(directory))
    return model


def apply_snapshot(model, directory: str | Path, state: dict[str, torch.Tensor]):
    """A snapshot's tensors into `model`: an adapter applied to it, or full weights loaded (strict)."""
    if is_adapter(directory):
        return apply_adapter(model, directory, state)
    model.load_state_dict(state, strict=True)
    return model


def merged_model(base: str, adapter_dir: str | Path, dtype: str = "float32"):
    """The base model (path or hub id) with the adapter folded into its weights: a plain transformers model."""
    from peft import PeftModel

    from .models import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm(base, dtype), str(adapter_dir))
    return model.merge_and_unload()


def parameter_bytes(params: int, dtype: str) -> int:
    return params * getattr(torch, dtype).itemsize


def saved_name(param_name: str, adapter: bool = True) -> str:
    """A parameter's name as PEFT saves it (the adapter's name dropped: lora_A.default.weight ->
    lora_A.weight), so DeepSpeed's and the torch backend's adapter files agree."""
    return param_name.replace(".default.", ".") if adapter else param_name


def base_logits(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Logits of the base model: a PEFT-wrapped model with its adapter off, any other model as it is."""
    if not is_peft(model):
        return model(input_ids=ids, attention_mask=attn).logits
    with model.disable_adapter():
        return model(input_ids=ids, attention_mask=attn).logits
