"""Attention test cases: shapes, the grid they come from, and how a case is laid out in a pool.

A case is plain data (hashable, printable as a pytest id). :func:`layout` turns it into a
paged layout the way the allocator would: each request owns whole pages picked at random from
the pool (so neighbouring tokens are rarely neighbouring slots), token ``i`` of a request sits at
offset ``i % page_size`` of its page, and page 0 (the padding page) is never used.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

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
        return (f"b{self.batch_size}-{lens}-h{self.num_heads}kv{self.num_kv_heads}"
                f"-d{self.head_dim}-p{self.page_size}")


def _short(xs: tuple[int, ...]) -> str:
    return ",".join(map(str, xs)) if len(xs) <= 4 else f"{min(xs)}..{max(xs)}"


@dataclass(frozen=True)
class Layout:
    """Where a case's tokens live: ``req_to_token`` rows, one per request (row 0 unused, like a
    padding row), and the pool size (in slots, excluding the padding page) that holds them."""

    req_to_token: torch.Tensor     # [B + 1, max_seq] int32
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
        ((2048,), (7,)),                                   # one long cached prefix
        ((0, 0, 0), (1, 100, 257)),                        # plain prefill, ragged
        ((0, 1, 300, 1023), (33, 1, 64, 5)),               # mixed prefix hits
        (_ragged(rng, 32, 0, 512), _ragged(rng, 32, 1, 16)),  # a full batch of chunks
    ]
    return [AttentionCase(p, e, *cfg, seed=i) for i, (cfg, (p, e)) in enumerate(
        itertools.product(_head_configs((1, 3, 8), (64, 128), (1, 16)), shapes))]


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
    return [AttentionCase(p, (1,) * len(p), *cfg, seed=i) for i, (cfg, p) in enumerate(
        itertools.product(_head_configs((1, 3, 8), (64, 128), (1, 16)), shapes))]
