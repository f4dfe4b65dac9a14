"""The fused mixture-of-experts product in Triton (``TritonBackend.fused_moe``), the shape of
SGLang's and vLLM's ``fused_moe``: the same result as :func:`plait.ops.fused_moe.fused_experts`.

1. :func:`align_by_expert` sorts the ``T * k`` (token, slot) pairs by expert and pads each
   expert's run to a multiple of ``BLOCK_M``: ``sorted_pairs`` (padding holds the sentinel
   ``T * k``) and ``block_expert[b]``, the one expert of block ``b`` (``E`` past the last
   block: the program exits). Torch ops on the device only, no host read, and every size is a
   function of ``T``, ``k`` and ``E``: the launch can be recorded in a CUDA graph.
2. :func:`_gate_up_kernel`: each program takes one block of pairs (one expert) and a tile of
   ``I`` columns, gathers the pairs' token rows of ``hidden``, and multiplies them by the
   expert's gate rows and up rows in two accumulators; ``act(gate) * up`` is written to
   ``inter[pair]`` (the activation fused: no ``[T*k, 2I]`` buffer).
3. :func:`_down_kernel`: the same blocks times the expert's ``w_down`` tile, scaled by the
   pair's routing weight, written to ``out_pairs[pair]``; the ``k`` rows of each token are
   summed in torch (``view(T, k, H).sum(1)``).

fp32 takes exact ("ieee") dots, fp16/bf16 the tensor cores (``plait.backends.cuda.dot_inputs``),
accumulation in fp32. Tiles are small under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.backends.cuda.dot_inputs import INTERPRETED, compute_dtype, dot_precision
from plait.ops.fused_moe import check_shapes

#: activation name -> the kernels' ``ACT`` code
_ACT = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_tanh": 2}


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * tl.sigmoid(x)
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh via sigmoid


@triton.jit
def _gate_up_kernel(
    X,
    W,
    Inter,
    SortedPairs,
    BlockExpert,
    num_pairs,
    num_experts,
    H,
    I,
    K: tl.constexpr,
    stride_xt,
    stride_we,
    stride_wn,
    stride_it,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m)
    if e >= num_experts:
        return
    pairs = tl.load(SortedPairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    tokens = (pairs // K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    w_gate = W + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    w_up = w_gate + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < H
        x = tl.load(
            X + tokens[:, None] * stride_xt + ks[None, :],
            mask=valid[:, None] & mask_k[None, :],
            other=0.0,
        ).to(COMPUTE)
        wm = mask_n[:, None] & mask_k[None, :]
        g = tl.load(w_gate + ks[None, :], mask=wm, other=0.0).to(COMPUTE)
        u = tl.load(w_up + ks[None, :], mask=wm, other=0.0).to(COMPUTE)
        acc_g = tl.dot(x, tl.trans(g), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, tl.trans(u), acc_u, input_precision=PRECISION)
    # round each product to the activations' dtype first, as the torch op's Linear does
    g = acc_g.to(Inter.dtype.element_ty).to(tl.float32)
    u = acc_u.to(Inter.dtype.element_ty).to(tl.float32)
    h = _activate(g, ACT) * u
    ptrs = Inter + pairs.to(tl.int64)[:, None] * stride_it + offs_n[None, :]
    tl.store(ptrs, h.to(Inter.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _down_kernel(
    Inter,
    W,
    Out,
    TopkWeights,
    SortedPairs,
    BlockExpert,
    num_pairs,
    num_experts,
    H,
    I,
    stride_it,
    stride_we,
    stride_wn,
    stride_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m)
    if e >= num_experts:
        return
    pairs = tl.load(SortedPairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = pairs.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = W + e.to(tl.int64) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < I
        a = tl.load(
            Inter + rows[:, None] * stride_it + ks[None, :],
            mask=valid[:, None] & mask_k[None, :],
            other=0.0,
        ).to(COMPUTE)
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w.to(COMPUTE)), acc, input_precision=PRECISION)
    weight = tl.load(TopkWeights + rows, mask=valid, other=0.0)
    y = acc.to(Out.dtype.element_ty).to(tl.float32) * weight[:, None]
    ptrs = Out + rows[:, None] * stride_ot + offs_n[None, :]
    tl.store(ptrs, y.to(Out.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_pairs, block_expert)`` (module docstring, step 1): expert ``e``'s pairs fill
    blocks of ``block_m`` rows starting at a multiple of ``block_m``, in token order, padded
    with ``T * k``. Device ops only; the sizes depend on ``T * k`` and ``E`` alone."""
    flat = topk_ids.reshape(-1)
    n, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first = counts.cumsum(0) - counts  # where each expert's pairs start, unpadded
    rank = torch.arange(n, device=device) - first[expert_of]
    dest = (padded_end - padded)[expert_of] + rank
    # at most min(n, E) experts have pairs, each padding fewer than block_m rows
    capacity = triton.cdiv(n + min(n, num_experts) * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((capacity,), n, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    return sorted_pairs, block_expert


def _tiles(num_pairs: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)``: small under the interpreter; on a GPU,
    the row block just covering decode's few pairs per expert."""
    if INTERPRETED:
        return 16, 32, 32, 1
    return (16 if num_pairs <= 64 else 64), 64, 64, 4


def fused_experts_triton(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """:func:`plait.ops.fused_moe.fused_experts` in two Triton launches (module docstring)."""
    num_experts, inter, k = check_shapes(hidden, w_gate_up, w_down, topk_weights, topk_ids)
    if activation not in _ACT:
        raise ValueError(
            f"MoE activation {activation!r} is not supported (supported: {', '.join(_ACT)})"
        )
    t, h = hidden.shape
    n = t * k
    if n == 0:
        return torch.zeros_like(hidden)
    block_m, block_n, block_k, warps = _tiles(n)
    sorted_pairs, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    wg = w_gate_up if w_gate_up.stride(-1) == 1 else w_gate_up.contiguous()
    wd = w_down if w_down.stride(-1) == 1 else w_down.contiguous()
    inter_rows = torch.empty(n, inter, dtype=hidden.dtype, device=hidden.device)
    out_pairs = torch.zeros(n, h, dtype=hidden.dtype, device=hidden.device)
    weights = topk_weights.reshape(-1).float().contiguous()
    blocks = sorted_pairs.numel() // block_m
    common = dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        COMPUTE=compute_dtype(hidden.dtype),
        PRECISION=dot_precision(hidden.dtype),
        num_warps=warps,
    )
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](
        x, wg, inter_rows, sorted_pairs, block_expert, n, num_experts, h, inter, k,
        x.stride(0), wg.stride(0), wg.stride(1), inter_rows.stride(0),
        ACT=_ACT[activation], **common,
    )  # fmt: skip
    _down_kernel[(blocks, triton.cdiv(h, block_n))](
        inter_rows, wd, out_pairs, weights, sorted_pairs, block_expert, n, num_experts, h,
        inter, inter_rows.stride(0), wd.stride(0), wd.stride(1), out_pairs.stride(0),
        **common,
    )  # fmt: skip
    return out_pairs.view(t, k, h).sum(dim=1)
