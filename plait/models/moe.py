"""Mixture-of-experts pieces shared by every MoE architecture (Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek): top-k routing, the experts' weights and the sparse block around them.

- Routing (:func:`softmax_topk`): softmax over the router's logits in float32, the top ``k``
  experts, optionally renormalised so the kept weights sum to 1 (Mixtral always;
  Qwen2/Qwen3-MoE when ``norm_topk_prob``), exactly as transformers routes.
- :class:`MoEExperts` holds ``w_gate_up[E, 2I, H]`` and ``w_down[E, H, I]`` and runs them
  through a :class:`~plait.ops.fused_moe.FusedExperts` op: the backend's
  (``Backend.fused_moe()``, handed to the loader in ``ModelSpec.fused_moe``), by default
  :func:`~plait.ops.fused_moe.fused_experts`, torch, grouped by expert.
- :class:`SparseMoeBlock`: router + experts (+ Qwen2-MoE's shared expert behind a sigmoid gate).

Quantized experts (``--quantization int8/int4``) are :class:`QuantizedMoEExperts`
(``plait.models.moe_quant``): one :class:`~plait.quant.modules.QuantizedLinear` per expert
and projection, run grouped by expert through the backend's quantized matmul.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.ops.fused_moe import FusedExperts, activation_fn, fused_experts

__all__ = [
    "FusedExperts",
    "GatedMLP",
    "MoEExperts",
    "SparseMoeBlock",
    "fused_experts",
    "softmax_topk",
]


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights [T, k] float32, topk_ids [T, k] int64)``: the softmax (in float32) of
    each token's router logits, its ``top_k`` largest entries, divided by their sum when
    ``renormalize`` (transformers' ``norm_topk_prob``)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoEExperts(nn.Module):
    """``E`` gated MLP experts as two stacked weights, run by ``op`` (``fused_experts``'s
    signature). ``w_gate_up[e]``: expert ``e``'s gate rows ``[0, I)`` then up rows ``[I, 2I)``."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        op: FusedExperts | None = None,
    ):
        super().__init__()
        activation_fn(activation)  # refuse an unknown activation at build time
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.w_gate_up = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.w_down = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False
        )
        self.op: FusedExperts = op or fused_experts

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.op(x, self.w_gate_up, self.w_down, topk_weights, topk_ids, self.activation)

    def extra_repr(self) -> str:
        e, two_i, h = self.w_gate_up.shape
        return f"experts={e}, hidden={h}, intermediate={two_i // 2}, act={self.activation}"


class GatedMLP(nn.Module):
    """``down(act(gate x) * up x)`` with gate and up fused in one Linear (Qwen2-MoE's shared
    expert; the same parameter names as Llama's MLP, ``gate_up_proj`` and ``down_proj``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu"):
        super().__init__()
        self.inter = intermediate_size
        self.act = activation_fn(activation)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SparseMoeBlock(nn.Module):
    """The MoE layer: ``gate`` (the router, [E, H], no bias) picks ``top_k`` experts per token;
    their weighted outputs are summed; a ``shared_expert`` (when the config has one) is added
    to every token, scaled by ``sigmoid(shared_expert_gate x)``."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        activation: str = "silu",
        shared_intermediate_size: int = 0,
        op: FusedExperts | None = None,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts: nn.Module = MoEExperts(
            num_experts, hidden_size, intermediate_size, activation, op
        )
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, activation)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def sparse_block_from_config(
    config: Any, *, intermediate_size: int, num_experts: int, op: FusedExperts | None
) -> SparseMoeBlock:
    """A :class:`SparseMoeBlock` sized by a transformers MoE config (Mixtral, Qwen2/3-MoE)."""
    return SparseMoeBlock(
        hidden_size=config.hidden_size,
        num_experts=num_experts,
        top_k=config.num_experts_per_tok,
        intermediate_size=intermediate_size,
        # Mixtral always renormalises; Qwen's configs say so with norm_topk_prob
        renormalize=bool(getattr(config, "norm_topk_prob", True)),
        activation=config.hidden_act,
        shared_intermediate_size=getattr(config, "shared_expert_intermediate_size", 0) or 0,
        op=op,
    )
