"""Inference engines behind one small interface: vLLM (CPU or GPU build) and HF transformers."""

from .base import Engine, Sample, make_engine

__all__ = ["Engine", "Sample", "make_engine"]
