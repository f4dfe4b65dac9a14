"""Quantized stand-ins for ``nn.Linear`` / ``nn.Embedding`` and the swap of a model's layers.

The modules hold a :class:`~plait.quant.formats.QuantizedWeight` as plain tensors (not
buffers), so ``model.to(dtype)`` can never cast float16 scales; the loader swaps them in after
the model is on its device and in its dtype. The matmul is whatever the backend's
``quantized_linear(method)`` returned: the module never picks a kernel itself.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from plait.quant.formats import BLOCK, QuantizedWeight, dequantize, quantize_int4, quantize_int8

log = logging.getLogger(__name__)

QuantizedMatmul = Callable[[torch.Tensor, QuantizedWeight], torch.Tensor]


class QuantizedLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, matmul: QuantizedMatmul):
        super().__init__()
        self.qweight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.matmul = matmul
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.qweight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        w = self.qweight
        return (
            f"in={self.in_features}, out={self.out_features}, bits={w.bits}, "
            f"group={w.group_size}, mins={w.mins is not None}"
        )


class QuantizedEmbedding(nn.Module):
    """Looks up quantized rows and dequantizes only those (GGUF's Q8_0 token embedding)."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.qweight = weight
        self.dtype = dtype

    @property
    def num_embeddings(self) -> int:
        """The rows it holds (one scale row per embedding row)."""
        return int(self.qweight.scales.shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight.rows(flat), self.dtype)
        return rows.view(*ids.shape, rows.shape[-1])


def int4_group_for(in_features: int, group_size: int) -> int | None:
    """The largest multiple of 32 that divides ``in_features`` and is <= ``group_size``
    (SmolLM2's 576 inputs take groups of 96 when 128 is asked for); None if none does."""
    for g in range(group_size - group_size % BLOCK, 0, -BLOCK):
        if in_features % g == 0:
            return g
    return None


def quantize_linears(
    model: nn.Module,
    method: str,
    matmul: QuantizedMatmul,
    group_size: int = 32,
    symmetric: bool = False,
    skip: tuple[str, ...] = ("lm_head",),
) -> int:
    """Replace every ``nn.Linear`` (except ``skip`` names, like vLLM keeps the LM head in
    float) with a :class:`QuantizedLinear` holding its int8 / int4 weight. A layer whose input
    size is no multiple of 32 stays float (and is logged). Returns how many were replaced."""
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear) or full in skip:
                continue
            k = child.in_features
            if method == "int8":
                w = quantize_int8(child.weight) if k % BLOCK == 0 else None
            else:
                g = int4_group_for(k, group_size)
                w = quantize_int4(child.weight, g, symmetric) if g else None
            if w is None:
                log.warning(
                    "%s: in_features=%d is no multiple of %d; left in float", full, k, BLOCK
                )
                continue
            setattr(parent, name, QuantizedLinear(w, child.bias, matmul))
            replaced += 1
    return replaced


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: parameters, persistent buffers, the buffers a module
    names in its ``weight_buffers`` (the CPU backend's prepacked Linear weights, panel or
    oneDNN), oneDNN-layout buffers and quantized weights, each storage counted once (tied
    weights share one), other non-persistent buffers (RoPE tables) excluded."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None:
            return
        if t.layout == torch._mkldnn:  # oneDNN-packed (the CPU backend's): opaque, not shared
            total += t.numel() * t.element_size()
        elif t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
    for m in model.modules():  # buffers hold weights too (prepacked Linears)
        declared = getattr(m, "weight_buffers", ())
        for name, b in m.named_buffers(recurse=False):
            if b is not None and (
                b.layout == torch._mkldnn
                or name in declared
                or name not in m._non_persistent_buffers_set
            ):
                add(b)
        w = getattr(m, "qweight", None)
        if isinstance(w, QuantizedWeight):
            add(w.qs), add(w.scales), add(w.mins)
    return total


def torch_quantized_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The portable matmul: dequantize, then ``F.linear``. Runs on any device torch does; the
    float weight exists only during the call (correct, but no faster than float weights)."""
    return F.linear(x, dequantize(w, x.dtype).to(x.device))
