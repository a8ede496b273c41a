"""Inference engines behind one small interface: vLLM (CPU or GPU build) and HF transformers.

The factory lives here, not next to the interface in base.py: the engines import base.py for
`Sample`, so a factory there would import them back (a cycle); nothing imports this package's
`__init__` from inside it.
"""

from __future__ import annotations

from ..api import JobSpec
from .base import Engine, Sample

__all__ = ["Engine", "Sample", "make_engine"]


def make_engine(spec: JobSpec, model_path: str) -> Engine:
    """The engine named by `spec.generator.engine`; vLLM is imported only when chosen."""
    if spec.generator.engine == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(spec, model_path)
    from .hf import HFEngine

    return HFEngine(spec, model_path)
