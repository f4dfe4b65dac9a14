"""The one in-memory format for weight-only quantized matrices, its quantizers and its
reference dequantization.

A ``[N, K]`` weight (``N`` output rows, ``K`` inputs) is cut along ``K`` into blocks of 32
(GGUF's block size) and into groups of ``group_size`` (a multiple of 32) that share a scale:

============  =============================  ==========================================
bits          ``qs``                         weight value
============  =============================  ==========================================
8             int8 ``[N, K]``                ``q * scale``
4, mins       uint8 ``[N, K/2]``             ``q * scale + min``   (q in 0..15; GGUF Q4_1)
4, no mins    uint8 ``[N, K/2]``             ``(q - 8) * scale``   (GGUF Q4_0)
============  =============================  ==========================================

``scales`` (and ``mins``) are float16 ``[N, K/group_size]``, as GGUF stores them. 4-bit codes use
GGUF's nibble order: byte ``j`` of a 32-weight block holds weight ``j`` in its low nibble and
weight ``j + 16`` in its high nibble, so GGUF Q4 blocks are copied, never re-packed.

Invariants: ``K % 32 == 0``, ``K % group_size == 0``, ``group_size % 32 == 0``; ``mins`` only
with ``bits == 4``. Every value above is exact in float32 (a 4/8-bit integer times a float16),
so any kernel that computes ``q * scale (+ min)`` in float32 reproduces :func:`dequantize`
bit for bit; only the order of the dot product's additions may differ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32


@dataclass
class QuantizedWeight:
    bits: int
    group_size: int
    qs: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, groups = self.scales.shape
        k = groups * self.group_size
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size % BLOCK or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive multiple of {BLOCK}, "
                             f"got {self.group_size}")
        want = (n, k // 2) if self.bits == 4 else (n, k)
        dtype = torch.uint8 if self.bits == 4 else torch.int8
        if tuple(self.qs.shape) != want or self.qs.dtype != dtype:
            raise ValueError(f"qs must be {dtype} {want}, got {self.qs.dtype} "
                             f"{tuple(self.qs.shape)}")
        if self.scales.dtype != torch.float16:
            raise ValueError(f"scales must be float16, got {self.scales.dtype}")
        if self.mins is not None and (self.bits != 4 or self.mins.shape != self.scales.shape
                                      or self.mins.dtype != torch.float16):
            raise ValueError("mins must be float16 shaped like scales, and only with bits=4")

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return self.scales.shape[0], self.scales.shape[1] * self.group_size

    def nbytes(self) -> int:
        tensors = [self.qs, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """The weight made of rows ``index`` (a permutation or a lookup), still quantized."""
        pick = lambda t: None if t is None else t[index].contiguous()  # noqa: E731
        return QuantizedWeight(self.bits, self.group_size, pick(self.qs), pick(self.scales),
                               pick(self.mins))


def unpack_int4(qs: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` in GGUF nibble order -> codes 0..15 as uint8 ``[N, K]``."""
    n = qs.shape[0]
    blocks = qs.view(n, -1, BLOCK // 2)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=-1).reshape(n, -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[N, K]`` -> uint8 ``[N, K/2]`` in GGUF nibble order (inverse of unpack)."""
    n = codes.shape[0]
    blocks = codes.to(torch.uint8).view(n, -1, BLOCK)
    return (blocks[..., :BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)).reshape(n, -1)


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float ``[N, K]`` matrix ``w`` stands for: the reference every kernel must match."""
    n, k = w.shape
    if w.bits == 8:
        q = w.qs.float()
    else:
        q = unpack_int4(w.qs).float()
        if w.mins is None:
            q = q - 8
    q = q.view(n, k // w.group_size, w.group_size)
    out = q * w.scales.float()[..., None]
    if w.mins is not None:
        out = out + w.mins.float()[..., None]
    return out.reshape(n, k).to(dtype)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8 (codes -127..127, one scale per row)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    q = torch.round(w / safe).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(8, w.shape[1], q.contiguous(), scale.contiguous())


def quantize_int4(weight: torch.Tensor, group_size: int = 128,
                  symmetric: bool = False) -> QuantizedWeight:
    """Group-wise int4. Asymmetric: ``q * scale + min`` over each group's [min, max];
    symmetric: ``(q - 8) * scale`` with ``scale = absmax / 7``. Scales and mins are rounded to
    float16 *before* the codes are chosen, so the codes fit the stored values."""
    n, k = weight.shape
    if group_size % BLOCK or k % group_size:
        raise ValueError(f"group_size must be a multiple of {BLOCK} dividing in_features={k}, "
                         f"got {group_size}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    if symmetric:
        scale = (w.abs().amax(dim=-1) / 7).to(torch.float16)
        mins, offset = None, 8
    else:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15).to(torch.float16)
        mins, offset = lo.to(torch.float16), 0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()[..., None]
    shifted = w - mins.float()[..., None] if mins is not None else w
    codes = (torch.round(shifted / safe) + offset).clamp_(0, 15).view(n, k)
    return QuantizedWeight(4, group_size, pack_int4(codes), scale.contiguous(),
                           None if mins is None else mins.contiguous())
