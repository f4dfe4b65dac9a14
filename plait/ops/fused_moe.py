"""The fused mixture-of-experts product in torch: the default of ``Backend.fused_moe`` and the
reference every backend's kernel is tested against.

``fused_experts(hidden[T, H], w_gate_up[E, 2I, H], w_down[E, H, I], topk_weights[T, k],
topk_ids[T, k], activation)`` returns ``out[T, H]`` with
``out[t] = sum_j topk_weights[t, j] * down_e(act(gate_e x_t) * up_e x_t)``, ``e = topk_ids[t, j]``,
where ``gate_e`` is rows ``[0, I)`` of ``w_gate_up[e]`` and ``up_e`` rows ``[I, 2I)``.

How it runs (what makes it "fused"): the ``T * k`` (token, expert) pairs are sorted by expert
once; each expert that has pairs multiplies all of its rows in one product (two matmuls), and
the weighted rows are added back to their tokens with one ``index_add_``. So the Python loop is
over experts that have tokens, never over tokens: a decode batch of 64 costs at most ``E``
grouped products, as a batch of 1 costs ``k``. The per-expert arithmetic is the one
transformers' ``MixtralExperts`` does (linear, chunk, act * up, linear, times the weight), so
float32 results agree with it up to the order of the final additions.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

#: activation names as checkpoints' ``hidden_act`` spells them -> the function
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class FusedExperts(Protocol):
    """The op a backend supplies for MoE layers (``Backend.fused_moe()``): the signature and
    result of :func:`fused_experts`."""

    def __call__(
        self,
        hidden: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: str = "silu",
    ) -> torch.Tensor: ...


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP's activation for ``name``; ValueError naming the supported ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"MoE activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        ) from None


def check_shapes(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> tuple[int, int, int]:
    """``(E, I, k)`` after checking the operands agree; ValueError naming the mismatch."""
    t, h = hidden.shape
    e, two_i, h2 = w_gate_up.shape
    if h2 != h or two_i % 2 or w_down.shape != (e, h, two_i // 2):
        raise ValueError(
            f"fused_experts: w_gate_up {tuple(w_gate_up.shape)} and w_down "
            f"{tuple(w_down.shape)} do not fit hidden {tuple(hidden.shape)} "
            "(want [E, 2I, H] and [E, H, I])"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != t:
        raise ValueError(
            f"fused_experts: topk_ids {tuple(topk_ids.shape)} and topk_weights "
            f"{tuple(topk_weights.shape)} must both be [T={t}, k]"
        )
    return e, two_i // 2, topk_ids.shape[1]


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """The flat (token, slot) pair indices ordered by expert (stable: tokens ascending within
    an expert) and how many pairs each expert has."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts.tolist()


def grouped_experts(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert(topk_ids[t, j], hidden[t])`` for every token, with
    one ``expert(e, rows)`` call per expert that has rows (``rows``: all of its tokens'
    hidden states, [n_e, H]). Shared by the float op and the quantized experts, whose
    ``expert`` calls the backend's quantized matmul."""
    k = topk_ids.shape[1]
    order, counts = sort_by_expert(topk_ids, num_experts)
    tokens = order // k
    rows = hidden[tokens]  # [T*k, H], grouped by expert
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            outs.append(expert(e, rows[start : start + n]))
            start += n
    out = torch.zeros_like(hidden)
    if not outs:
        return out
    weights = topk_weights.reshape(-1)[order].to(hidden.dtype)
    out.index_add_(0, tokens, torch.cat(outs) * weights[:, None])
    return out


def fused_experts(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The MoE product (module docstring) in torch: one grouped product per expert with
    tokens, on any device torch runs on."""
    num_experts, inter, _ = check_shapes(hidden, w_gate_up, w_down, topk_weights, topk_ids)
    act = activation_fn(activation)

    def expert(e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, w_gate_up[e]).split(inter, dim=-1)
        return F.linear(act(gate) * up, w_down[e])

    return grouped_experts(hidden, topk_weights, topk_ids, num_experts, expert)
