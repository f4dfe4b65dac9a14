"""Weight-only quantized experts (``--quantization int8`` / ``int4`` on a MoE checkpoint).

Each expert's ``gate_up`` [2I, H] and ``down`` [H, I] become a
:class:`~plait.quant.modules.QuantizedLinear` (the format and kernels every quantized Linear
uses: ``Backend.quantized_linear``), run grouped by expert exactly like the float op
(:func:`plait.ops.fused_moe.grouped_experts`): one quantized product per expert that has
tokens. The router stays in float (vLLM keeps it so too: it is tiny and decides routing).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from plait.models.moe import MoEExperts
from plait.ops.fused_moe import activation_fn, grouped_experts
from plait.quant.formats import BLOCK, quantize_int4, quantize_int8
from plait.quant.modules import QuantizedLinear, QuantizedMatmul, int4_group_for, quantize_linears

log = logging.getLogger(__name__)


class QuantizedMoEExperts(nn.Module):
    """The experts of one layer as quantized Linears: ``gate_up[e]`` then ``down[e]``."""

    def __init__(
        self, gate_up: list[QuantizedLinear], down: list[QuantizedLinear], activation: str
    ):
        super().__init__()
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.num_experts = len(gate_up)
        self.intermediate_size = gate_up[0].out_features // 2
        self.activation = activation
        self._act = activation_fn(activation)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = self.gate_up[e](rows).split(self.intermediate_size, dim=-1)
            return self.down[e](self._act(gate) * up)

        return grouped_experts(x, topk_weights, topk_ids, self.num_experts, expert)


def _quantize(w: torch.Tensor, method: str, group_size: int, symmetric: bool):
    k = w.shape[1]
    if method == "int8":
        return quantize_int8(w) if k % BLOCK == 0 else None
    g = int4_group_for(k, group_size)
    return quantize_int4(w, g, symmetric) if g else None


def quantize_experts(
    experts: MoEExperts, method: str, matmul: QuantizedMatmul, group_size: int, symmetric: bool
) -> QuantizedMoEExperts | None:
    """``experts`` quantized, or None (left in float, logged) when a projection's input size
    is no multiple of 32."""
    gate_up, down = [], []
    for e in range(experts.num_experts):
        wg = _quantize(experts.w_gate_up[e], method, group_size, symmetric)
        wd = _quantize(experts.w_down[e], method, group_size, symmetric)
        if wg is None or wd is None:
            return None
        gate_up.append(QuantizedLinear(wg, None, matmul))
        down.append(QuantizedLinear(wd, None, matmul))
    return QuantizedMoEExperts(gate_up, down, experts.activation)


def quantize_moe_model(
    model: nn.Module, method: str, matmul: QuantizedMatmul, group_size: int, symmetric: bool
) -> int:
    """Quantize the decoder's Linears (as for a dense model; the routers and the shared
    experts' sigmoid gates stay float) and every layer's experts. Returns how many expert
    sets were quantized."""
    gates = tuple(
        f"{name}.{g}"
        for name, m in model.named_modules()
        if isinstance(getattr(m, "experts", None), MoEExperts)
        for g in ("gate", "shared_expert_gate")
    )
    quantize_linears(model, method, matmul, group_size, symmetric, skip=("lm_head", *gates))
    done = 0
    for name, block in list(model.named_modules()):
        experts = getattr(block, "experts", None)
        if not isinstance(experts, MoEExperts):
            continue
        q = quantize_experts(experts, method, matmul, group_size, symmetric)
        if q is None:
            log.warning("%s.experts: a size is no multiple of %d; left in float", name, BLOCK)
            continue
        block.experts = q
        done += 1
    return done
