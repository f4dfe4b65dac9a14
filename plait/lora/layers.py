"""The wrapped projections: the base module untouched, the batch's LoRA deltas added after it.

:func:`wrap_model` replaces ``qkv_proj``, ``o_proj``, ``gate_up_proj`` and ``down_proj`` of each
layer of a Llama-layout model (those with a targeted sub-module) by a :class:`LoraLinear`
around the original module, whatever it is (plain, packed, quantized: the adapter stays in
the activation dtype). A backend's compiled or native step that captured the original modules
keeps them; the model runs the eager layers for any batch that carries adapters
(``LlamaForCausalLM.forward``), so those always go through the wrappers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from plait.lora.ops import LoraBatch, apply_grouped
from plait.lora.pool import LoraPool

#: ``(x, y, a, b, batch) -> y + delta``: the batched product a device uses
LoraOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LoraBatch], torch.Tensor]


class LoraContext:
    """What every wrapper of one model reads: the pool and this forward's layout (None: no
    request of the forward has an adapter)."""

    def __init__(self, pool: LoraPool, op: LoraOp = apply_grouped):
        self.pool = pool
        self.op = op
        self.batch: LoraBatch | None = None


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, ctx: LoraContext, layer: int, group: str):
        super().__init__()
        self.base = base
        self.layer = layer
        self.group = group
        self._ctx = ctx  # shared, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self._ctx.batch
        if batch is None:
            return y
        pool = self._ctx.pool
        return self._ctx.op(
            x, y, pool.a[self.layer][self.group], pool.b[self.layer][self.group], batch
        )

    def __getattr__(self, name: str) -> Any:
        # weight, bias, in/out_features...: what code reading the projection expects
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)


def wrap_model(model: nn.Module, ctx: LoraContext) -> int:
    """Wrap the targeted projections of every layer; returns how many were wrapped."""
    count = 0
    layers = getattr(model, "layers", None)
    if layers is None or not all(
        hasattr(lay, "self_attn") and hasattr(lay.self_attn, "qkv_proj") for lay in layers
    ):
        raise ValueError(
            f"lora_paths: model {type(model).__name__} does not have Plait's Llama layout "
            "(fused qkv_proj and gate_up_proj); LoRA adapters need it"
        )
    for i, layer in enumerate(layers):
        for group in ctx.pool.groups:
            owner = layer.self_attn if group in ("qkv_proj", "o_proj") else layer.mlp
            current = getattr(owner, group)
            if isinstance(current, LoraLinear):
                raise ValueError(f"layer {i} {group} is already wrapped for LoRA")
            setattr(owner, group, LoraLinear(current, ctx, i, group))
            count += 1
    return count
