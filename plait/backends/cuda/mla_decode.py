"""Multi-head latent attention decode in Triton over the paged latent pool (absorbed form,
``plait.core.mla``).

Grid (B, cdiv(H, BLOCK_H)): one program takes ``BLOCK_H`` query heads of one request and walks
its rows in ``BLOCK_N`` tiles with an online softmax. Every head shares the one latent row per
token, so a tile of rows is loaded once for all the program's heads: the score is
``q_latent . c + q_rope . k_rope`` (two dots, the latent and RoPE parts padded to powers of
two separately), the output the softmax-weighted sum of the ``c`` rows. Lengths come from
``seq_lens`` on the device (no host reads), so the launch can sit inside a captured graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.backends.cuda.dot_inputs import compute_dtype, dot_precision
from plait.backends.cuda.extend_attention import LOG2E
from plait.backends.cuda.launch import LaunchParams

BLOCK_H = 16  # tl.dot needs >= 16 rows; heads past H are masked padding


@triton.jit
def _mla_decode_kernel(
    Q,
    Buf,
    Out,
    ReqToToken,
    ReqPoolIdx,
    SeqLens,
    stride_qb,
    stride_qh,
    stride_buf,
    stride_ob,
    stride_oh,
    stride_req,
    num_heads,
    qk_scale,
    RANK: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    mask_h = heads < num_heads
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < RANK
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < ROPE

    q_row = Q + b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_r[None, :], mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    q_pe = tl.load(
        q_row + RANK + offs_p[None, :], mask=mask_h[:, None] & mask_p[None, :], other=0.0
    )
    q_lat = q_lat.to(COMPUTE)
    q_pe = q_pe.to(COMPUTE)

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    row = ReqToToken + tl.load(ReqPoolIdx + b).to(tl.int64) * stride_req
    m_i = tl.full([BLOCK_HEADS], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_HEADS], tl.float32)
    acc = tl.zeros([BLOCK_HEADS, BLOCK_R], tl.float32)
    for n in range(0, seq_len, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        slots = tl.load(row + offs_n, mask=mask_n, other=0).to(tl.int64)
        base = Buf + slots * stride_buf
        c_t = tl.load(  # [R, N]: the rows' latents, transposed for the score dot
            base[None, :] + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0
        ).to(COMPUTE)
        pe_t = tl.load(
            base[None, :] + RANK + offs_p[:, None],
            mask=mask_p[:, None] & mask_n[None, :],
            other=0.0,
        ).to(COMPUTE)
        qk = tl.dot(q_lat, c_t, input_precision=PRECISION)
        qk += tl.dot(q_pe, pe_t, input_precision=PRECISION)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # base-2 logits
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        c = tl.load(
            base[:, None] + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0
        ).to(COMPUTE)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), c, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_r[None, :]
    tl.store(o_ptrs, out, mask=mask_h[:, None] & mask_r[None, :])


def mla_decode_attention(
    q: torch.Tensor,
    buffer: torch.Tensor,
    kv_lora_rank: int,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    params: LaunchParams,
) -> torch.Tensor:
    """q: [B, H, R + P]; buffer: [S, 1, R + P] (one layer of a latent pool). Returns
    [B, H, R]: each head's softmax(scale * q . row) over request b's first ``seq_lens[b]``
    rows times the rows' first R channels."""
    bsz, heads, width = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    rope = width - kv_lora_rank
    out = q.new_empty(bsz, heads, kv_lora_rank)
    grid = (bsz, triton.cdiv(heads, BLOCK_H))
    _mla_decode_kernel[grid](
        q,
        buffer,
        out,
        req_to_token,
        req_pool_indices,
        seq_lens,
        q.stride(0),
        q.stride(1),
        buffer.stride(0),
        out.stride(0),
        out.stride(1),
        req_to_token.stride(0),
        heads,
        scale * LOG2E,
        RANK=kv_lora_rank,
        ROPE=rope,
        BLOCK_R=max(16, triton.next_power_of_2(kv_lora_rank)),
        BLOCK_P=max(16, triton.next_power_of_2(rope)),
        BLOCK_HEADS=BLOCK_H,
        BLOCK_N=params.decode_block_n,
        COMPUTE=compute_dtype(q.dtype),
        PRECISION=dot_precision(q.dtype),
        **params.launch_kwargs(),
    )
    return out
