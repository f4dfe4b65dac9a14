"""Test cases: shapes, the grid they come from, and the data a case stands for.

A case is plain data (hashable, printable as a pytest id). :func:`layout` turns an attention
case into a paged layout the way the allocator would: each request owns whole pages picked at
random from the pool (so neighbouring tokens are rarely neighbouring slots), token ``i`` of a
request sits at offset ``i % page_size`` of its page, and page 0 (the padding page) is never
used. :func:`quant_weight` builds a quantized-matmul case's weight on the CPU.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from plait.quant.formats import QuantizedWeight, quantize_int4, quantize_int8

GQA_HEADS = {1: (4, 4), 3: (6, 2), 8: (8, 1)}  # ratio -> (num_heads, num_kv_heads)


@dataclass(frozen=True)
class AttentionCase:
    """One attention call. Decode cases have ``extend_lens`` all 1 (prefix = seq_len - 1)."""

    prefix_lens: tuple[int, ...]
    extend_lens: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    seed: int = 0

    @property
    def batch_size(self) -> int:
        return len(self.prefix_lens)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        return tuple(p + e for p, e in zip(self.prefix_lens, self.extend_lens))

    @property
    def id(self) -> str:
        lens = _short(self.prefix_lens) + "+" + _short(self.extend_lens)
        return (
            f"b{self.batch_size}-{lens}-h{self.num_heads}kv{self.num_kv_heads}"
            f"-d{self.head_dim}-p{self.page_size}"
        )


def _short(xs: tuple[int, ...]) -> str:
    return ",".join(map(str, xs)) if len(xs) <= 4 else f"{min(xs)}..{max(xs)}"


@dataclass(frozen=True)
class Layout:
    """Where a case's tokens live: ``req_to_token`` rows, one per request (row 0 unused, like a
    padding row), and the pool size (in slots, excluding the padding page) that holds them."""

    req_to_token: torch.Tensor  # [B + 1, max_seq] int32
    req_pool_indices: torch.Tensor  # [B] int64
    num_slots: int


def layout(case: AttentionCase) -> Layout:
    rng = random.Random(case.seed)
    ps = case.page_size
    pages_per_req = [-(-s // ps) for s in case.seq_lens]
    num_pages = sum(pages_per_req) + 2  # a little slack: free pages the kernels must not read
    free = list(range(1, num_pages + 1))
    rng.shuffle(free)
    max_seq = max(case.seq_lens)
    r2t = torch.zeros(case.batch_size + 1, max(max_seq, 1), dtype=torch.int32)
    for b, (seq, n) in enumerate(zip(case.seq_lens, pages_per_req)):
        pages = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int64)
        slots = (pages[:, None] * ps + torch.arange(ps)).flatten()[:seq]
        r2t[b + 1, :seq] = slots.to(torch.int32)
    return Layout(r2t, torch.arange(1, case.batch_size + 1), num_pages * ps)


# -- grids --------------------------------------------------------------------------------------


def _ragged(rng: random.Random, n: int, lo: int, hi: int) -> tuple[int, ...]:
    return tuple(rng.randint(lo, hi) for _ in range(n))


def _head_configs(ratios, head_dims, page_sizes):
    for ratio, d, ps in itertools.product(ratios, head_dims, page_sizes):
        yield (*GQA_HEADS[ratio], d, ps)


def extend_cases(grid: str = "quick") -> list[AttentionCase]:
    """``quick``: small shapes that exercise every code path (empty and non-empty prefixes,
    tile edges, every GQA ratio, both page sizes) in seconds under an interpreter.
    ``full``: batch 1..32, prefix 0..2048, GQA 1/3/8, head dim 64/128, page size 1/16."""
    rng = random.Random(1234)
    if grid == "quick":
        return [
            AttentionCase((0, 19), (17, 5), 4, 4, 64, 1, seed=1),
            AttentionCase((33, 0, 3), (1, 20, 9), 6, 2, 64, 16, seed=2),
            AttentionCase((40,), (18,), 6, 2, 128, 1, seed=3),
            AttentionCase((33, 0, 3), (1, 20, 9), 8, 1, 128, 16, seed=4),
        ]
    if grid != "full":
        raise ValueError(f"grid must be 'quick' or 'full', got {grid!r}")
    shapes = [
        ((2048,), (7,)),  # one long cached prefix
        ((0, 0, 0), (1, 100, 257)),  # plain prefill, ragged
        ((0, 1, 300, 1023), (33, 1, 64, 5)),  # mixed prefix hits
        (_ragged(rng, 32, 0, 512), _ragged(rng, 32, 1, 16)),  # a full batch of chunks
    ]
    return [
        AttentionCase(p, e, *cfg, seed=i)
        for i, (cfg, (p, e)) in enumerate(
            itertools.product(_head_configs((1, 3, 8), (64, 128), (1, 16)), shapes)
        )
    ]


def decode_cases(grid: str = "quick") -> list[AttentionCase]:
    """Like :func:`extend_cases`, one new token per request (seq_len = prefix + 1)."""
    rng = random.Random(4321)
    if grid == "quick":
        return [
            AttentionCase((0, 39, 76), (1, 1, 1), 4, 4, 64, 1, seed=1),
            AttentionCase((0, 39, 76), (1, 1, 1), 6, 2, 64, 16, seed=2),
            AttentionCase((70,), (1,), 8, 1, 128, 16, seed=3),
            AttentionCase(_ragged(rng, 32, 0, 40), (1,) * 32, 3, 1, 64, 16, seed=4),
        ]
    if grid != "full":
        raise ValueError(f"grid must be 'quick' or 'full', got {grid!r}")
    shapes = [(2048,), (0, 1, 15, 16, 17), _ragged(rng, 32, 0, 2048), _ragged(rng, 7, 0, 3)]
    return [
        AttentionCase(p, (1,) * len(p), *cfg, seed=i)
        for i, (cfg, p) in enumerate(
            itertools.product(_head_configs((1, 3, 8), (64, 128), (1, 16)), shapes)
        )
    ]


# -- quantized matmul ---------------------------------------------------------------------------

#: format -> the ``--quantization`` method that produces it
QUANT_FORMATS = {"int8": "int8", "q8_0": "gguf", "q4_1": "int4", "q4_0": "gguf"}


@dataclass(frozen=True)
class QuantCase:
    """``x[m, k] @ dequantize(w)[n, k]^T`` for a weight of format ``fmt`` (a key of
    :data:`QUANT_FORMATS`) with groups of ``group_size`` along ``k``."""

    fmt: str
    m: int
    n: int
    k: int
    group_size: int
    seed: int = 0

    @property
    def method(self) -> str:
        return QUANT_FORMATS[self.fmt]

    @property
    def id(self) -> str:
        return f"{self.fmt}-m{self.m}-n{self.n}-k{self.k}-g{self.group_size}"


def quant_weight(case: QuantCase) -> QuantizedWeight:
    """The case's weight (CPU): ``int8`` per channel and ``q4_1``/``q4_0`` from the quantizers
    on a random normal matrix; ``q8_0`` GGUF-style, random codes and scales in groups."""
    gen = torch.Generator().manual_seed(case.seed)
    if case.fmt == "q8_0":
        codes = torch.randint(-127, 128, (case.n, case.k), generator=gen, dtype=torch.int8)
        scales = torch.rand(case.n, case.k // case.group_size, generator=gen) / 50
        return QuantizedWeight(8, case.group_size, codes, scales.half())
    w = torch.randn(case.n, case.k, generator=gen)
    if case.fmt == "int8":
        return quantize_int8(w)
    return quantize_int4(w, case.group_size, symmetric=case.fmt == "q4_0")


def quant_cases(grid: str = "quick") -> list[QuantCase]:
    """``quick``: every format, group sizes 32/64/96/128 and per-channel, ``m`` from 1 past a
    tile edge, in seconds under an interpreter. ``full``: SmolLM2's Linear shapes at decode
    and prefill sizes, every format."""
    if grid == "quick":
        return [
            QuantCase("int8", 1, 40, 576, 576, seed=1),
            QuantCase("q8_0", 3, 33, 96, 32, seed=2),
            QuantCase("q4_1", 17, 70, 256, 64, seed=3),
            QuantCase("q4_0", 33, 64, 384, 128, seed=4),
            QuantCase("q4_1", 5, 24, 192, 96, seed=5),
        ]
    if grid != "full":
        raise ValueError(f"grid must be 'quick' or 'full', got {grid!r}")
    shapes = [(1, 960, 576), (16, 1536, 576), (64, 576, 1536), (257, 3072, 576)]
    return [
        QuantCase(fmt, m, n, k, k if fmt == "int8" else 32 if fmt == "q8_0" else 64, i)
        for i, (fmt, (m, n, k)) in enumerate(itertools.product(QUANT_FORMATS, shapes))
    ]
