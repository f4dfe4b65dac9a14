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

import itertools
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
            raise ValueError(
                f"group_size must be a positive multiple of {BLOCK}, got {self.group_size}"
            )
        want = (n, k // 2) if self.bits == 4 else (n, k)
        dtype = torch.uint8 if self.bits == 4 else torch.int8
        if tuple(self.qs.shape) != want or self.qs.dtype != dtype:
            raise ValueError(
                f"qs must be {dtype} {want}, got {self.qs.dtype} {tuple(self.qs.shape)}"
            )
        if self.scales.dtype != torch.float16:
            raise ValueError(f"scales must be float16, got {self.scales.dtype}")
        if self.mins is not None and (
            self.bits != 4
            or self.mins.shape != self.scales.shape
            or self.mins.dtype != torch.float16
        ):
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
        return QuantizedWeight(
            self.bits, self.group_size, pick(self.qs), pick(self.scales), pick(self.mins)
        )


def unpack_int4(qs: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` in GGUF nibble order -> codes 0..15 as uint8 ``[N, K]``."""
    n = qs.shape[0]
    blocks = qs.view(n, -1, BLOCK // 2)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=-1).reshape(n, -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 ``[N, K]`` -> uint8 ``[N, K/2]`` in GGUF nibble order (inverse of unpack)."""
    n = codes.shape[0]
    blocks = codes.to(torch.uint8).view(n, -1, BLOCK)
    return (blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)).reshape(n, -1)


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


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``x [M, K]`` as the int8-activation kernels see them (GGUF's Q8 scheme, as
    llama.cpp multiplies quantized weights): per block of 32, ``d = amax / 127`` and codes
    ``round(x * (1 / d))`` (half to even), so ``|x - d * code| <= d / 2``. Returns int8 codes
    ``[M, K]`` and float32 ``d`` ``[M, K/32]``; computed in float32, so a kernel doing the same
    float32 operations reproduces it exactly."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    codes = torch.round(blocks * inv[..., None]).to(torch.int8)
    return codes.reshape(m, k), d


#: Clipping factors tried per channel / group, 1.0 down to 0.8: the range is ``factor * max``
#: (AWQ-style clipping; llama.cpp's quantizers search scales the same way). 1.0 (plain
#: round-to-nearest) is always tried, so the search never does worse than it on weight MSE.
SHRINKS = tuple(1 - 0.02 * i for i in range(11))


def _half(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the float16 the format stores (so codes are chosen for stored values)."""
    return t.to(torch.float16).float()


def _codes(
    w: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, qmin: int, qmax: int
) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round((w if mins is None else w - mins) / safe).clamp_(qmin, qmax)


def _least_squares(
    w: torch.Tensor, q: torch.Tensor, asymmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``scale`` (and ``min``) minimising ``sum (q * scale (+ min) - w)^2`` per row for fixed
    codes ``q``; rows where the fit is degenerate (all codes equal) get NaN, so they fall back
    to the candidate they refit."""
    sq, sqq, sqw = q.sum(-1, True), (q * q).sum(-1, True), (q * w).sum(-1, True)
    if not asymmetric:
        return sqw / sqq.where(sqq > 0, torch.nan), None
    n, sw = w.shape[-1], w.sum(-1, True)
    det = n * sqq - sq * sq
    det = det.where(det > 0, torch.nan)
    return (n * sqw - sq * sw) / det, (sqq * sw - sq * sqw) / det


def fit_scales(
    w: torch.Tensor, qmin: int, qmax: int, asymmetric: bool, shrinks: tuple[float, ...] = SHRINKS
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Round-to-nearest codes for each row of ``w`` (a channel or a group) with the float16
    ``scale`` (and ``min``) of least weight MSE: ``w ~ q * scale (+ min)``, ``q`` in
    ``qmin..qmax``. For every factor in ``shrinks`` the range is clipped to ``factor *`` the
    row's extremes (symmetric: the value of largest magnitude maps to ``qmin``, and to ``qmax``
    where the code range is lopsided like int4's -8..7; asymmetric: ``[factor * min,
    factor * max]`` onto ``0..qmax``), the codes rounded, then scale and min refitted to those
    codes by least squares and the codes rounded again; each row keeps its best candidate.
    Returns ``(scale, min or None, q)``, all float32."""
    if asymmetric:
        lo, hi = w.amin(-1, True), w.amax(-1, True)
    else:
        big = w.gather(-1, w.abs().argmax(-1, keepdim=True))  # signed: maps onto an end
    ends = (qmax,) if asymmetric else ((qmin,) if qmin == -qmax else (qmin, qmax))
    best_err = best = None
    for factor, end, refit in itertools.product(shrinks, ends, (False, True)):
        if not refit:  # a fresh clipped range
            scale = _half((hi - lo if asymmetric else big) * factor / end)
            mins = _half(lo * factor) if asymmetric else None
        else:  # the same candidate's codes, scale (and min) refitted to them
            s2, m2 = _least_squares(w, _codes(w, scale, mins, qmin, qmax), asymmetric)
            scale = _half(s2.where(s2.isfinite(), scale))
            mins = None if mins is None else _half(m2.where(m2.isfinite(), mins))
        q = _codes(w, scale, mins, qmin, qmax)
        err = ((q * scale - w if mins is None else q * scale + mins - w) ** 2).sum(-1, True)
        if best is None:
            best_err, best = err, (scale, mins, q)
            continue
        keep = err < best_err
        best_err = torch.where(keep, err, best_err)
        best = tuple(
            None if b is None else torch.where(keep, c, b) for b, c in zip(best, (scale, mins, q))
        )
    return best


def quantize_int8(weight: torch.Tensor, shrinks: tuple[float, ...] = SHRINKS) -> QuantizedWeight:
    """Symmetric per-output-channel int8: codes -127..127, one scale per row, chosen by
    :func:`fit_scales` (``shrinks=(1.0,)``: plain absmax round-to-nearest)."""
    w = weight.detach().float().contiguous()
    scale, _, q = fit_scales(w, -127, 127, False, shrinks)
    return QuantizedWeight(
        8, w.shape[1], q.to(torch.int8).contiguous(), scale.to(torch.float16).contiguous()
    )


def quantize_int4(
    weight: torch.Tensor,
    group_size: int = 32,
    symmetric: bool = False,
    shrinks: tuple[float, ...] = SHRINKS,
) -> QuantizedWeight:
    """Group-wise int4 with scales from :func:`fit_scales`. Asymmetric: ``q * scale + min``,
    ``q`` in 0..15 (GGUF Q4_1's form); symmetric: ``(q - 8) * scale`` (Q4_0's form), the
    group's value of largest magnitude at code 0 so all 16 levels are used."""
    n, k = weight.shape
    if group_size % BLOCK or k % group_size:
        raise ValueError(
            f"group_size must be a multiple of {BLOCK} dividing in_features={k}, got {group_size}"
        )
    w = weight.detach().float().reshape(n * k // group_size, group_size)
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    scale, mins, q = fit_scales(w, qmin, qmax, not symmetric, shrinks)
    half = lambda t: t.reshape(n, k // group_size).to(torch.float16).contiguous()  # noqa: E731
    return QuantizedWeight(
        4,
        group_size,
        pack_int4((q - qmin).reshape(n, k)),
        half(scale),
        None if mins is None else half(mins),
    )
