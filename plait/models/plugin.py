"""Registers Plait's own architectures (entry point ``plait.models: builtin``), exactly as a
third-party package would: Llama (SmolLM2's too), Mistral and Qwen2 share
:class:`~plait.models.llama.LlamaForCausalLM`, whose config switches (sliding windows, q/k/v
bias, head_dim) cover their differences."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from plait.models.hookspecs import hookimpl

if TYPE_CHECKING:
    from plait.core.backend_api import ModelLoader, ModelSpec
    from plait.quant.modules import QuantizedMatmul

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
#: mixture-of-experts architectures (``plait.models.moe_models``)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")


def load_llama(
    spec: ModelSpec, device: torch.device, matmul: QuantizedMatmul | None
) -> torch.nn.Module:
    """:func:`plait.models.loader.load_model` for ``spec`` (looked up at call time, so a test
    may replace it in a worker process)."""
    from plait.models import loader

    return loader.load_model(
        spec.model_dir,
        spec.hf_config,
        spec.dtype,
        device,
        spec.context_len,
        spec.tp,
        spec.quantization,
        matmul,
    )


def load_moe(
    spec: ModelSpec, device: torch.device, matmul: QuantizedMatmul | None
) -> torch.nn.Module:
    """:func:`plait.models.moe_loader.load_moe` for ``spec``."""
    from plait.models import moe_loader

    return moe_loader.load_moe(spec, device, matmul)


@hookimpl
def plait_register_models(register: Callable[[str, "ModelLoader"], None]) -> None:
    for name in ARCHITECTURES:
        register(name, load_llama)
    for name in MOE_ARCHITECTURES:
        register(name, load_moe)
