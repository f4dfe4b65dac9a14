"""Weight-only quantized matmul in Triton: ``y[M, N] = x[M, K] @ dequantize(w)[N, K]^T``.

The weight stays in its :class:`~plait.quant.formats.QuantizedWeight` form in memory; each
program loads a ``[BLOCK_N, BLOCK_K]`` tile of codes, dequantizes it in registers (in fp32:
``q * scale (+ min)``, one scale per 32-weight block, looked up by the block's group) and
feeds it to ``tl.dot`` with fp32 accumulation, so no float copy of the weight is ever written.
One program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y``; ``split_k > 1`` cuts the ``K`` loop
across programs that add their fp32 partials atomically (decode's small ``M`` leaves too few
output tiles to fill a GPU otherwise).

The dot runs in ``x``'s dtype: fp16/bf16 on the tensor cores, the dequantized tile rounded to
that dtype exactly as ``dequantize(w, x.dtype)`` rounds it; fp32 with exact ("ieee") dots, where
the dequantized values are exact (see :mod:`plait.quant.formats`). So the result matches
:func:`~plait.quant.formats.dequantize` followed by ``F.linear`` up to the order of the fp32
additions (and the output's rounding).

4-bit codes keep GGUF's nibble order: byte ``j`` of a 32-weight block holds weight ``j`` (low
nibble) and weight ``j + 16`` (high nibble). The kernel never re-orders the weight; it takes
the matching columns of ``x`` instead: the low nibbles of a tile's bytes meet ``x`` columns
``32b + j`` and the high nibbles columns ``32b + 16 + j``, as two dots of ``BLOCK_K / 2``
(both halves of a block share its scale).

Launches read nothing from the host but shapes, so the matmul can be recorded in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from plait.backends.cuda.dot_inputs import compute_dtype, dot_precision
from plait.quant.formats import BLOCK, QuantizedWeight


@triton.jit
def _qmatmul_kernel(
    X,
    QS,
    Scales,
    Mins,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_mn,
    stride_ym,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    HAS_MINS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    COMPUTE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    q_rows = QS + offs_n.to(tl.int64)[:, None] * stride_qn
    s_rows = Scales + offs_n.to(tl.int64) * stride_sn
    m_rows = Mins + offs_n.to(tl.int64) * stride_mn
    NB: tl.constexpr = BLOCK_K // 32  # 32-weight blocks per tile
    offs_b = tl.arange(0, NB)
    if BITS == 8:
        offs_k = tl.arange(0, BLOCK_K)
    else:
        offs_c = tl.arange(0, BLOCK_K // 2)  # byte column within the tile
        offs_lo = (offs_c // 16) * 32 + offs_c % 16  # x column of its low nibble

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    tiles = K // BLOCK_K
    per_split = tl.cdiv(tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, tiles)
    for t in range(first, last):
        k0 = t * BLOCK_K
        group = ((k0 // 32 + offs_b) // (GROUP // 32))[None, :]  # each block's group
        s = tl.load(s_rows[:, None] + group, mask=mask_n[:, None], other=0.0)
        s = s.to(tl.float32)[:, :, None]  # [BLOCK_N, NB, 1]
        if BITS == 8:
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0.0)
            q = tl.load(q_rows + (k0 + offs_k)[None, :], mask=mask_n[:, None], other=0)
            w = tl.reshape(tl.reshape(q.to(tl.float32), [BLOCK_N, NB, 32]) * s, [BLOCK_N, BLOCK_K])
            acc = tl.dot(x.to(COMPUTE), tl.trans(w.to(COMPUTE)), acc, input_precision=PRECISION)
        else:
            b = tl.load(q_rows + (k0 // 2 + offs_c)[None, :], mask=mask_n[:, None], other=0)
            lo = tl.reshape((b & 0xF).to(tl.float32), [BLOCK_N, NB, 16])
            hi = tl.reshape((b >> 4).to(tl.float32), [BLOCK_N, NB, 16])
            if HAS_MINS:
                mn = tl.load(m_rows[:, None] + group, mask=mask_n[:, None], other=0.0)
                mn = mn.to(tl.float32)[:, :, None]
                lo = lo * s + mn
                hi = hi * s + mn
            else:
                lo = (lo - 8.0) * s
                hi = (hi - 8.0) * s
            lo = tl.reshape(lo, [BLOCK_N, BLOCK_K // 2]).to(COMPUTE)
            hi = tl.reshape(hi, [BLOCK_N, BLOCK_K // 2]).to(COMPUTE)
            x_lo = tl.load(x_rows + (k0 + offs_lo)[None, :], mask=mask_m[:, None], other=0.0)
            x_hi = tl.load(x_rows + (k0 + 16 + offs_lo)[None, :], mask=mask_m[:, None], other=0.0)
            acc = tl.dot(x_lo.to(COMPUTE), tl.trans(lo), acc, input_precision=PRECISION)
            acc = tl.dot(x_hi.to(COMPUTE), tl.trans(hi), acc, input_precision=PRECISION)

    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@dataclass(frozen=True)
class QMatmulTiles:
    """Tile sizes and launch options of one call. ``block_m``/``block_n`` are powers of two
    >= 16 (``tl.dot``); ``block_k`` is a power of two >= 32 dividing ``K``;
    ``split_k >= 1`` programs share each output tile's K loop."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.block_k < BLOCK or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k must be a power of two >= {BLOCK}, got {self.block_k}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


def block_k_for(k: int, largest: int = 128) -> int:
    """The largest power of two in ``32..largest`` dividing ``k`` (always >= 32, as ``k`` is a
    multiple of 32)."""
    b = largest
    while k % b:
        b //= 2
    return b


def choose_tiles(m: int, n: int, k: int, num_sms: int = 0) -> QMatmulTiles:
    """Tiles by shape: ``block_m`` just covers small ``m`` (decode), the widest K tile dividing
    ``k``, and split-K when the output tiles alone would leave most of ``num_sms`` idle and
    ``K`` is long (``num_sms`` 0: unknown, no split)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    block_k = block_k_for(k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1
    k_tiles = k // block_k
    # Each split costs two extra launches (zero the fp32 buffer, cast it), about what a short
    # K loop takes: split only while every split keeps >= 6 K tiles (H200: 576 inputs never
    # split, 1536 split in two).
    while num_sms and tiles * split * 2 <= num_sms and split * 2 * 6 <= k_tiles:
        split *= 2
    return QMatmulTiles(block_m, block_n, block_k, split, num_warps=4 if block_m <= 32 else 8)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0  # the interpreter's CPU tensors: no SMs to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


def quantized_matmul(
    x: torch.Tensor, w: QuantizedWeight, tiles: QMatmulTiles | None = None
) -> torch.Tensor:
    """``x[..., K] @ dequantize(w)^T -> [..., N]`` in ``x``'s dtype (fp16, bf16 or fp32);
    ``tiles`` None: :func:`choose_tiles` for this shape and device."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = _unit_stride(x.reshape(-1, k))
    m = x2.shape[0]
    t = tiles or choose_tiles(m, n, k, _num_sms(x.device))
    if k % t.block_k:
        raise ValueError(f"tiles.block_k={t.block_k} must divide in_features={k}")
    split = t.split_k > 1
    y = (torch.zeros if split else torch.empty)(
        m, n, device=x.device, dtype=torch.float32 if split else x.dtype
    )
    if m == 0:
        return y.to(x.dtype).reshape(*lead, n)
    # The kernel steps along each row with unit stride (weights are contiguous as quantized).
    qs, scales = _unit_stride(w.qs), _unit_stride(w.scales)
    mins = scales if w.mins is None else _unit_stride(w.mins)  # never read without HAS_MINS
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), t.split_k)
    _qmatmul_kernel[grid](
        x2,
        qs,
        scales,
        mins,
        y,
        m,
        n,
        k,
        x2.stride(0),
        qs.stride(0),
        scales.stride(0),
        mins.stride(0),
        y.stride(0),
        GROUP=w.group_size,
        BITS=w.bits,
        HAS_MINS=w.mins is not None,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        SPLIT_K=t.split_k,
        COMPUTE=compute_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype),
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return (y.to(x.dtype) if split else y).reshape(*lead, n)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
