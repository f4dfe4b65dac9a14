"""Registers Plait's own architectures (entry point ``plait.models: builtin``), exactly as a
third-party package would: Llama (SmolLM2's too), Mistral and Qwen2 share
:class:`~plait.models.llama.LlamaForCausalLM`, whose config switches (sliding windows, q/k/v
bias, head_dim) cover their differences; the others name their module's class
(``MODEL_CLASSES``), imported only when such a checkpoint is loaded; the mixture-of-experts
ones (``MOE_ARCHITECTURES``) load through ``plait.models.moe_loader``; DeepSeek-V2/V3
(multi-head latent attention, :class:`~plait.models.deepseek.DeepseekForCausalLM`) have a
loader that also declares the latent KV layout; the null model (``plait.models.null``) times
the engine's host path."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

import torch

from plait.models import null
from plait.models.hookspecs import hookimpl

if TYPE_CHECKING:
    from plait.core.backend_api import ModelLoader, ModelSpec
    from plait.quant.modules import QuantizedMatmul

#: served by LlamaForCausalLM itself (Phi-3's fused checkpoint projections are the loader's
#: business: ``plait.models.loader._fused_in_checkpoint``)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")
#: architecture -> (module, class) of the Plait model that serves it
MODEL_CLASSES = {
    "Qwen3ForCausalLM": ("plait.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("plait.models.gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("plait.models.gemma", "GemmaForCausalLM"),
}
#: mixture-of-experts architectures (``plait.models.moe_models``, ``moe_loader``)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def load_llama(
    spec: ModelSpec, device: torch.device, matmul: QuantizedMatmul | None
) -> torch.nn.Module:
    """:func:`plait.models.loader.load_model` for ``spec`` (looked up at call time, so a test
    may replace it in a worker process)."""
    return _load_llama_family(spec, device, matmul)


#: the engine asks a loader this before it starts pipeline ranks (``plait.core.pp.config``);
#: the loader refuses any other model class itself (``plait.models.pp_stage.keep_stage``)
load_llama.supports_pipeline_parallel = True  # type: ignore[attr-defined]


def _load_llama_family(
    spec: ModelSpec,
    device: torch.device,
    matmul: QuantizedMatmul | None,
    model_cls: type[torch.nn.Module] | None = None,
) -> torch.nn.Module:
    from plait.models import loader

    extra: dict = {} if model_cls is None else {"model_cls": model_cls}
    if spec.pp.partial:
        extra["pp"] = spec.pp
    return loader.load_model(
        spec.model_dir,
        spec.hf_config,
        spec.dtype,
        device,
        spec.context_len,
        spec.tp,
        spec.quantization,
        matmul,
        **extra,
    )


def load_moe(
    spec: ModelSpec, device: torch.device, matmul: QuantizedMatmul | None
) -> torch.nn.Module:
    """:func:`plait.models.moe_loader.load_moe` for ``spec``."""
    from plait.models import moe_loader

    return moe_loader.load_moe(spec, device, matmul)


def class_loader(module: str, name: str) -> "ModelLoader":
    """A loader building ``module.name`` (a ``LlamaForCausalLM`` variant) through
    :func:`plait.models.loader.load_model`."""

    def load(
        spec: ModelSpec, device: torch.device, matmul: QuantizedMatmul | None
    ) -> torch.nn.Module:
        model_cls = getattr(importlib.import_module(module), name)
        return _load_llama_family(spec, device, matmul, model_cls)

    load.__qualname__ = f"class_loader[{name}]"
    return load


@hookimpl
def plait_register_models(register: Callable[[str, "ModelLoader"], None]) -> None:
    for name in ARCHITECTURES:
        register(name, load_llama)
    for name in MOE_ARCHITECTURES:
        register(name, load_moe)
    register(null.ARCHITECTURE, null.load_null)
    for name, (module, cls) in MODEL_CLASSES.items():
        register(name, _LOADERS.setdefault(name, class_loader(module, cls)))
    from plait.models.deepseek_loader import loaders

    for name, loader in loaders().items():
        register(name, _LOADERS.setdefault(name, loader))


# one loader object per architecture, so registering twice (a re-run hook) is not a clash
_LOADERS: dict[str, "ModelLoader"] = {}
