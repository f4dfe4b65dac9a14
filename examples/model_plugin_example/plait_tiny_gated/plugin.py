"""Registers ``TinyGatedLlamaForCausalLM`` (entry point ``plait.models: tiny_gated``)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from plait.models.hookspecs import hookimpl
from plait.models.loader import load_model
from plait_tiny_gated.model import ARCHITECTURE, TinyGatedLlamaForCausalLM


def load_tiny_gated(spec: Any, device: torch.device, matmul: Any) -> torch.nn.Module:
    """Plait's loader on our class: same parameter names, so the same weight mapping."""
    return load_model(
        spec.model_dir,
        spec.hf_config,
        spec.dtype,
        device,
        spec.context_len,
        spec.tp,
        spec.quantization,
        matmul,
        model_cls=TinyGatedLlamaForCausalLM,
    )


@hookimpl
def plait_register_models(register: Callable[[str, Any], None]) -> None:
    register(ARCHITECTURE, load_tiny_gated)
