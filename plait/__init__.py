"""Plait: program LLMs with an SGLang-compatible language and serve them on any accelerator."""
from plait.core.engine import Engine
from plait.core.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams"]
