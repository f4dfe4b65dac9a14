"""Split-KV flash-decode attention in Triton over the paged KV pool.

Decode has one query per request, too little work per request to fill a GPU, so each
request's KV is cut into ``num_kv_splits`` contiguous ranges processed in parallel:

* stage 1, grid (B, Hkv, splits): one program takes all ``Hq // Hkv`` query heads that share a
  KV head (GQA: each K/V row is loaded once for the whole group) over one range, and writes the
  range's normalised partial output and its log-sum-exp (base 2);
* stage 2, grid (B, Hq): merges the splits' partials weighted by ``exp2(lse - max lse)``.

With a sliding window W the ranges split the last ``min(seq_len, W)`` keys instead. The grid
never depends on sequence lengths (a split's range is computed from ``seq_lens`` on
the device), so a captured graph stays valid as sequences grow. A split with an empty range
writes ``lse = -inf`` and weighs nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.backends.cuda.dot_inputs import compute_dtype, dot_precision
from plait.backends.cuda.extend_attention import _scores, no_window, score_args
from plait.backends.cuda.launch import LaunchParams


@triton.jit
def _decode_stage1(
    Q,
    K,
    V,
    MidO,
    MidLse,
    ReqToToken,
    ReqPoolIdx,
    SeqLens,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_req,
    qk_scale,
    window,
    logit_cap,
    SOFTCAP: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_h = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_H)
    mask_h = offs_g < GROUP  # BLOCK_H >= 16 for tl.dot; rows past the group are padding
    heads = kv_h * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    row = ReqToToken + tl.load(ReqPoolIdx + b).to(tl.int64) * stride_req
    first = tl.maximum(seq_len - window, 0)  # the sliding window's first key (0 without one)
    split_len = tl.cdiv(seq_len - first, NUM_SPLITS)
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0).to(COMPUTE)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n in range(start, end, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(row + offs_n, mask=mask_n, other=0).to(tl.int64)
        k_ptrs = K + slots[None, :] * stride_kt + kv_h * stride_kh + offs_d[:, None]
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(COMPUTE)
        qk = _scores(tl.dot(q, k, input_precision=PRECISION), qk_scale, logit_cap, SOFTCAP)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        v_ptrs = V + slots[:, None] * stride_vt + kv_h * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(COMPUTE)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    mo_ptrs = (
        MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    )
    tl.store(mo_ptrs, out, mask=mask_h[:, None] & mask_d[None, :])
    tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=mask_h)


@triton.jit
def _decode_stage2(
    MidO,
    MidLse,
    O,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s)  # [S]
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe)  # empty split -> 0
    mo_ptrs = (
        MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :]
    )
    parts = tl.load(mo_ptrs, mask=mask_d[None, :], other=0.0)  # [S, D]
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    o: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    params: LaunchParams,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Writes ``o`` [B, Hq, D] for one query per request ``q`` [B, Hq, D] over its last
    ``window`` keys (all of them when None): the splits divide the window's keys only. With
    ``softcap`` c the scores are capped to ``c * tanh(s / c)``.

    Allocates its fp32 split buffers with torch on ``q``'s device; under graph capture they come
    from the graph's private memory pool. No host synchronisation happens here.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    splits = params.num_kv_splits
    block_d = triton.next_power_of_2(head_dim)
    mid_o = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    qk_scale, logit_cap, capped = score_args(scale, softcap)
    _decode_stage1[(batch, num_kv_heads, splits)](
        q,
        k_buffer,
        v_buffer,
        mid_o,
        mid_lse,
        req_to_token,
        req_pool_indices,
        seq_lens,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        req_to_token.stride(0),
        qk_scale,
        no_window(window),
        logit_cap,
        SOFTCAP=capped,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=params.decode_block_n,
        NUM_SPLITS=splits,
        COMPUTE=compute_dtype(q.dtype),
        PRECISION=dot_precision(q.dtype),
        **params.launch_kwargs(),
    )
    _decode_stage2[(batch, num_heads)](
        mid_o,
        mid_lse,
        o,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        o.stride(0),
        o.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        NUM_SPLITS=splits,
        **params.launch_kwargs(),
    )
    return o
