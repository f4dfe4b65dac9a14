"""DeepSeek's feed-forward blocks: the dense MLP of the first ``first_k_dense_replace`` layers
and the mixture of experts of the rest (routed experts plus always-on shared experts).

Routing follows transformers' ``DeepseekV2TopkRouter``/``DeepseekV3TopkRouter`` (router
logits in float32 from a float32 gate weight):

- V2 (:func:`route_v2`): softmax scores; ``topk_method="greedy"`` takes the top-k experts,
  ``"group_limited_greedy"`` first keeps the ``topk_group`` groups (of ``n_group``) with the
  highest single expert score and zeroes the others; weights times ``routed_scaling_factor``
  (renormalised first when ``norm_topk_prob``, as DeepSeek's own V2 code does).
- V3 (:func:`route_v3`): sigmoid scores; ``e_score_correction_bias`` is added for the choice
  only (groups ranked by the sum of their two best biased scores, ``topk_group`` kept, then
  the top-k biased experts), the weights are the unbiased scores of the chosen experts,
  renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``.

The routed experts run through one grouped call over all tokens: the backend's op when the
loader is handed one (``ModelSpec.fused_moe``), else :func:`plait.ops.fused_moe.fused_experts`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.ops.fused_moe import fused_experts

V2_METHODS = ("greedy", "group_limited_greedy")


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.inter = inter
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _group_mask(group_scores: torch.Tensor, topk_group: int, num_experts: int) -> torch.Tensor:
    """[T, E] bool: the experts of each token's ``topk_group`` best groups."""
    t, n_group = group_scores.shape
    keep = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    return mask.unsqueeze(-1).expand(t, n_group, num_experts // n_group).reshape(t, num_experts)


def route_v2(
    logits: torch.Tensor,
    *,
    top_k: int,
    method: str,
    n_group: int | None,
    topk_group: int | None,
    scaling: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64) from float32 router ``logits``."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if method == "group_limited_greedy":
        assert n_group is not None and topk_group is not None
        e = scores.shape[-1]
        group_scores = scores.view(-1, n_group, e // n_group).max(dim=-1).values
        scores = scores.masked_fill(~_group_mask(group_scores, topk_group, e), 0.0)
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    if normalize and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def route_v3(
    logits: torch.Tensor,
    bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    scaling: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64); ``bias`` steers the choice only."""
    scores = logits.sigmoid()
    choice = scores + bias
    e = scores.shape[-1]
    group_scores = choice.view(-1, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = choice.masked_fill(~_group_mask(group_scores, topk_group, e), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class DeepseekMoE(nn.Module):
    """Routed experts (``w_gate_up`` [E, 2I, H], ``w_down`` [E, H, I]) plus shared experts."""

    def __init__(self, config: Any, version: int):
        super().__init__()
        self.version = version
        #: the grouped experts op; the loader sets the backend's (``ModelSpec.fused_moe``)
        self.fused: Any = fused_experts
        e, h, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.scaling = float(config.routed_scaling_factor)
        self.normalize = bool(getattr(config, "norm_topk_prob", False))
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.method = getattr(config, "topk_method", None) or "greedy"
        check_routing(config, version)
        # float32 like transformers' (kept so by the loader); a Parameter, not a Linear, so no
        # backend repacks or quantizes it
        self.gate_weight = nn.Parameter(torch.empty(e, h), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e), requires_grad=False)
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * inter, h), requires_grad=False)
        self.w_down = nn.Parameter(torch.empty(e, h, inter), requires_grad=False)
        self.shared_experts = (
            GatedMLP(h, inter * config.n_shared_experts) if config.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate_weight.float())
        if self.version == 2:
            weights, ids = route_v2(
                logits,
                top_k=self.top_k,
                method=self.method,
                n_group=self.n_group,
                topk_group=self.topk_group,
                scaling=self.scaling,
                normalize=self.normalize,
            )
        else:
            weights, ids = route_v3(
                logits,
                self.e_score_correction_bias.float(),
                top_k=self.top_k,
                n_group=self.n_group,
                topk_group=self.topk_group,
                scaling=self.scaling,
                normalize=self.normalize,
            )
        out = self.fused(x, self.w_gate_up, self.w_down, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)


def check_routing(config: Any, version: int) -> None:
    """ValueError naming the setting this implementation cannot route with."""
    e = config.n_routed_experts
    grouped = version == 3 or getattr(config, "topk_method", None) == "group_limited_greedy"
    if version == 2 and (getattr(config, "topk_method", None) or "greedy") not in V2_METHODS:
        raise ValueError(f"topk_method={config.topk_method!r} is not supported ({V2_METHODS})")
    if grouped and not (config.n_group and config.topk_group and e % config.n_group == 0):
        raise ValueError(
            f"grouped routing needs n_group dividing n_routed_experts={e} and topk_group, "
            f"got n_group={config.n_group}, topk_group={config.topk_group}"
        )
    if getattr(config, "moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq={config.moe_layer_freq} is not supported (only 1)")
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (only 'silu')")
