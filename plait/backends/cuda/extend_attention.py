"""Extend (prefill) attention in Triton over the paged KV pool.

Request b's new tokens sit at positions ``prefix_lens[b] .. prefix_lens[b] + extend_lens[b]``
and their K/V are already in the pool. One program handles ``BLOCK_M`` new tokens of one query
head of one request and keeps a running (online) softmax in two stages:

1. the cached prefix, gathered slot by slot through ``req_to_token`` (no mask but the length
   and the sliding window),
2. the new tokens themselves, causally (new token i sees new tokens 0..i, within the window).

A sliding window W (``window``; full attention passes :data:`FULL_WINDOW`) hides the keys
``W`` or more positions before a query, as transformers' ``sliding_window_overlay`` does; each
tile's loops start at the first key its first row can see.

Slots come from ``req_to_token`` per token, so page size is a layout property the kernel never
sees. GQA: query head h reads KV head ``h // (Hq // Hkv)``. Scores use base-2 exponentials
(scale folded with log2(e)); accumulation is fp32 whatever the storage dtype, and the dots
take 16-bit inputs as they are (tensor cores), float32 ones exactly (``dot_inputs``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.backends.cuda.dot_inputs import compute_dtype, dot_precision
from plait.backends.cuda.launch import LaunchParams

LOG2E = 1.4426950408889634
#: the window the kernels take for "no sliding window": wider than any context
FULL_WINDOW = 1 << 30


def no_window(window: int | None) -> int:
    """The kernels' window argument: ``window``, or :data:`FULL_WINDOW` for full attention
    (one code path: a key is visible when ``query_pos - key_pos < window``)."""
    return FULL_WINDOW if window is None else window


def score_args(scale: float, softcap: float | None) -> tuple[float, float, bool]:
    """The kernels' ``(qk_scale, logit_cap, SOFTCAP)``: without a cap the scale is folded with
    log2(e); with one the cap needs the plain scaled score, so :func:`_scores` folds it after."""
    if softcap is None:
        return scale * LOG2E, 0.0, False
    return scale, float(softcap), True


@triton.jit
def _scores(qk, qk_scale, logit_cap, SOFTCAP: tl.constexpr):
    """Base-2 scores from the raw dot products: ``qk * qk_scale``, or with a logit cap c
    ``c * tanh(qk * scale / c) * log2(e)`` (tanh as ``2 * sigmoid(2x) - 1``)."""
    if SOFTCAP:
        s = qk * qk_scale / logit_cap
        return (2.0 * tl.sigmoid(2.0 * s) - 1.0) * (logit_cap * 1.4426950408889634)
    return qk * qk_scale


@triton.jit
def _online_softmax_step(
    q,
    k_ptrs,
    v_ptrs,
    kv_mask,
    score_mask,
    m_i,
    l_i,
    acc,
    qk_scale,
    logit_cap,
    SOFTCAP: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One BLOCK_N step of the online softmax; ``score_mask`` [M, N] marks visible keys."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(COMPUTE)  # [D, N]
    qk = _scores(tl.dot(q, k, input_precision=PRECISION), qk_scale, logit_cap, SOFTCAP)
    qk = tl.where(score_mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with nothing visible yet keeps m = -inf; subtracting 0 keeps exp2 at 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    v = tl.load(v_ptrs, mask=tl.trans(kv_mask), other=0.0).to(COMPUTE)  # [N, D]
    acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    O,
    ReqToToken,
    ReqPoolIdx,
    PrefixLens,
    ExtendLens,
    QStart,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_req,
    qk_scale,
    window,
    logit_cap,
    SOFTCAP: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_h = h // GROUP

    prefix = tl.load(PrefixLens + b).to(tl.int32)
    ext = tl.load(ExtendLens + b).to(tl.int32)
    if m_block * BLOCK_M >= ext:
        return
    q_start = tl.load(QStart + b).to(tl.int64)
    row = ReqToToken + tl.load(ReqPoolIdx + b).to(tl.int64) * stride_req

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ext
    mask_d = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(COMPUTE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + kv_h * stride_kh
    v_base = V + kv_h * stride_vh

    # Stage 1: the cached prefix; every query row sees every prefix key within its window
    # (query position prefix + m, key position n: visible when prefix + m - n < window).
    # Keys before the tile's first row's window are seen by no row: the loop starts there.
    lo = tl.maximum(prefix + m_block * BLOCK_M - window + 1, 0)
    for start in range(lo, prefix, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < prefix
        slots = tl.load(row + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_d[:, None] & mask_n[None, :]
        visible = mask_n[None, :] & (prefix + offs_m[:, None] - offs_n[None, :] < window)
        m_i, l_i, acc = _online_softmax_step(
            q,
            k_base + slots[None, :] * stride_kt + offs_d[:, None],
            v_base + slots[:, None] * stride_vt + offs_d[None, :],
            kv_mask,
            visible,
            m_i,
            l_i,
            acc,
            qk_scale,
            logit_cap,
            SOFTCAP,
            COMPUTE,
            PRECISION,
        )

    # Stage 2: the new tokens, causally; keys past this tile's last row are never visible.
    end = tl.minimum(ext, (m_block + 1) * BLOCK_M)
    lo = tl.maximum(m_block * BLOCK_M - window + 1, 0)
    for start in range(lo, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < ext
        slots = tl.load(row + prefix + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_d[:, None] & mask_n[None, :]
        causal = offs_m[:, None] >= offs_n[None, :]
        visible = mask_n[None, :] & causal & (offs_m[:, None] - offs_n[None, :] < window)
        m_i, l_i, acc = _online_softmax_step(
            q,
            k_base + slots[None, :] * stride_kt + offs_d[:, None],
            v_base + slots[:, None] * stride_vt + offs_d[None, :],
            kv_mask,
            visible,
            m_i,
            l_i,
            acc,
            qk_scale,
            logit_cap,
            SOFTCAP,
            COMPUTE,
            PRECISION,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = O + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    o: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start: torch.Tensor,
    max_extend_len: int,
    scale: float,
    params: LaunchParams,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Writes ``o`` [T, Hq, D] for the new tokens ``q`` [T, Hq, D]; with a sliding ``window``
    W each sees only the keys less than W positions before it; with ``softcap`` c the scores
    are capped to ``c * tanh(s / c)`` (Gemma 2).

    ``extend_start[b]`` is request b's first row in q; ``max_extend_len`` (a host int) sizes the
    grid. Buffers are [S, Hkv, D] pool rows addressed by slot.
    """
    batch, num_heads, head_dim = len(prefix_lens), q.shape[1], q.shape[2]
    group = num_heads // k_buffer.shape[1]
    block_n = params.extend_block_n
    if q.element_size() == 4 and head_dim > 64:
        block_n = max(16, block_n // 2)  # fp32 K/V tiles are twice the shared memory of fp16
    grid = (batch, num_heads, triton.cdiv(max_extend_len, params.extend_block_m))
    qk_scale, logit_cap, capped = score_args(scale, softcap)
    _extend_kernel[grid](
        q,
        k_buffer,
        v_buffer,
        o,
        req_to_token,
        req_pool_indices,
        prefix_lens,
        extend_lens,
        extend_start,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        o.stride(0),
        o.stride(1),
        req_to_token.stride(0),
        qk_scale,
        no_window(window),
        logit_cap,
        SOFTCAP=capped,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=params.extend_block_m,
        BLOCK_N=block_n,
        COMPUTE=compute_dtype(q.dtype),
        PRECISION=dot_precision(q.dtype),
        **params.launch_kwargs(),
    )
    return o
