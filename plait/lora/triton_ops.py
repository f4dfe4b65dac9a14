"""Segmented LoRA shrink and expand for CUDA/ROCm in Triton (S-LoRA/Punica's SGMV).

One program takes ``BLOCK_M`` rows of one segment (a request's rows, all on one adapter slot)
and reads that slot's weights only, so a batch mixing adapters costs one launch per product
whatever the mix; base-model requests have no segment and are never touched.

- shrink: ``h[rows] = x[rows] @ A[slot].T`` (``A [S, K, N]``, ``h`` float32 ``[T, K]``);
- expand: ``y[rows, cols] += (h[rows] @ B[slot, cols].T) * scaling`` (``B [S, O, K]``),
  in place.

Accumulation is float32; float32 inputs take exact ("ieee") dots, 16-bit ones the tensor
cores (``plait.backends.cuda.dot_inputs``). The interpreter (``TRITON_INTERPRET=1``) runs the
same kernels on CPU tensors: ``tests/backends/test_triton_lora.py`` holds them to
:func:`plait.lora.ops.apply_grouped`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.backends.cuda.dot_inputs import compute_dtype, dot_precision
from plait.lora.ops import LoraBatch

BLOCK_M = 16
BLOCK_N = 32  # shrink: input columns per step
BLOCK_O = 64  # expand: output columns per program


@triton.jit
def _shrink(
    X, A, H, Starts, Lens, Slots,
    N, K, stride_xm, stride_as, stride_ak, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_M
    length = tl.load(Lens + seg)
    if first < length:
        start = tl.load(Starts + seg)
        slot = tl.load(Slots + seg).to(tl.int64)
        offs_m = first + tl.arange(0, BLOCK_M)
        mask_m = offs_m < length
        rows = (start + offs_m).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            x = tl.load(
                X + rows[:, None] * stride_xm + offs_n[None, :],
                mask=mask_m[:, None] & mask_n[None, :],
                other=0.0,
            )
            a = tl.load(
                A + slot * stride_as + offs_k[:, None] * stride_ak + offs_n[None, :],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = tl.dot(x.to(COMPUTE), tl.trans(a.to(COMPUTE)), acc, input_precision=PRECISION)
        tl.store(
            H + rows[:, None] * stride_hm + offs_k[None, :],
            acc,
            mask=mask_m[:, None] & mask_k[None, :],
        )


@triton.jit
def _expand(
    H, B, Y, Starts, Lens, Slots, Scales,
    O, K, stride_hm, stride_bs, stride_bo, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_M
    length = tl.load(Lens + seg)
    if first < length:
        start = tl.load(Starts + seg)
        slot = tl.load(Slots + seg).to(tl.int64)
        scale = tl.load(Scales + seg)
        offs_m = first + tl.arange(0, BLOCK_M)
        mask_m = offs_m < length
        rows = (start + offs_m).to(tl.int64)
        offs_o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_o = offs_o < O
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        h = tl.load(
            H + rows[:, None] * stride_hm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            B + slot * stride_bs + offs_o[:, None] * stride_bo + offs_k[None, :],
            mask=mask_o[:, None] & mask_k[None, :],
            other=0.0,
        )
        delta = tl.dot(h.to(COMPUTE), tl.trans(b.to(COMPUTE)), input_precision=PRECISION)
        y_ptrs = Y + rows[:, None] * stride_ym + offs_o[None, :]
        mask = mask_m[:, None] & mask_o[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + delta * scale).to(Y.dtype.element_ty), mask=mask)


def apply_segmented(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoraBatch
) -> torch.Tensor:
    """``y`` (contiguous ``[T, O]``) plus each segment's delta, in place; the same contract
    as :func:`plait.lora.ops.apply_grouped`."""
    segs = int(batch.seg_lens.numel())
    if segs == 0:
        return y
    x = x.contiguous()
    if not y.is_contiguous():
        y = y.contiguous()
    a, b = a.contiguous(), b.contiguous()
    t, n = x.shape
    k, o = a.shape[1], b.shape[1]
    block_k = max(16, triton.next_power_of_2(k))
    h = torch.empty(t, k, device=x.device, dtype=torch.float32)
    blocks_m = triton.cdiv(batch.max_seg_len, BLOCK_M)
    compute, precision = compute_dtype(x.dtype), dot_precision(x.dtype)
    starts, lens, slots = batch.seg_starts, batch.seg_lens, batch.seg_slots
    _shrink[(segs, blocks_m)](
        x, a, h, starts, lens, slots,
        n, k, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        COMPUTE=compute, PRECISION=precision,
    )  # fmt: skip
    _expand[(segs, blocks_m, triton.cdiv(o, BLOCK_O))](
        h, b, y, starts, lens, slots, batch.seg_scales,
        o, k, h.stride(0), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_K=block_k,
        COMPUTE=compute, PRECISION=precision,
    )  # fmt: skip
    return y
