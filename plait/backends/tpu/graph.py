"""Graph capture on TPU: each step shape is ``jax.jit``-compiled once, from a bounded set.

XLA compiles a program per input shape, so the runner pads every step to a *bucket*:

- decode: ``(batch, kv_width)``;
- extend: ``(tokens, batch, kv_width, logit_rows)``;

where ``batch`` is one of :attr:`JitBuckets.batch_sizes`, ``tokens`` and ``kv_width`` are powers
of two between a floor and a ceiling the pool and context fix, and ``logit_rows`` is ``batch``
(one row per request) or ``tokens`` (prompt logprobs). So the number of programs is bounded
before the first request arrives (:meth:`JitBuckets.max_programs`), and
:class:`CompiledSteps` refuses, rather than compiles, a key outside the buckets.

Each program is compiled ahead of time (``jit(...).lower(...).compile()``): calling it with
any other shape is an error, never a silent recompile, so :attr:`CompiledSteps.compiles`
counts every compilation the runner ever does.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclass(frozen=True)
class JitBuckets:
    """The padded shapes steps compile for.

    Invariants: ``batch_sizes`` is sorted and ends at the most requests one step may hold;
    ``min_tokens <= max_tokens`` and ``min_kv_width <= max_kv_width`` are powers of two; every
    kv width is a multiple of the page size (checked by the runner)."""

    batch_sizes: tuple[int, ...]
    min_tokens: int
    max_tokens: int
    min_kv_width: int
    max_kv_width: int

    @classmethod
    def build(
        cls,
        max_batch_size: int,
        max_tokens: int,
        context_len: int,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        min_tokens: int = 16,
        min_kv_width: int = 128,
    ) -> "JitBuckets":
        """Buckets for a runner serving ``max_batch_size`` requests, at most ``max_tokens``
        new tokens per step (the pool's size bounds it) and sequences up to ``context_len``."""
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_tokens", max_tokens),
            ("context_len", context_len),
            ("min_tokens", min_tokens),
            ("min_kv_width", min_kv_width),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        sizes = tuple(sorted({s for s in batch_sizes if 0 < s < max_batch_size} | {max_batch_size}))
        min_tokens, min_kv_width = pow2_at_least(min_tokens), pow2_at_least(min_kv_width)
        return cls(
            sizes,
            min_tokens,
            pow2_at_least(max_tokens, min_tokens),
            min_kv_width,
            pow2_at_least(context_len, min_kv_width),
        )

    def batch(self, n: int) -> int:
        if not 0 < n <= self.batch_sizes[-1]:
            raise ValueError(
                f"batch of {n} requests is outside the jit buckets (1..{self.batch_sizes[-1]})"
            )
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]

    def tokens(self, n: int) -> int:
        return self._pow2("tokens", n, self.min_tokens, self.max_tokens)

    def kv_width(self, n: int) -> int:
        return self._pow2("kv width", n, self.min_kv_width, self.max_kv_width)

    @staticmethod
    def _pow2(what: str, n: int, lo: int, hi: int) -> int:
        b = pow2_at_least(n, lo)
        if b > hi:
            raise ValueError(f"{what} {n} exceeds the largest jit bucket {hi}")
        return b

    def max_programs(self) -> int:
        """How many programs the runner can ever compile (decode and extend together)."""

        def count(lo: int, hi: int) -> int:
            return int(math.log2(hi // lo)) + 1

        widths, tokens = (
            count(self.min_kv_width, self.max_kv_width),
            count(self.min_tokens, self.max_tokens),
        )
        batches = len(self.batch_sizes)
        return batches * widths + tokens * batches * widths * 2


@dataclass
class CompiledSteps:
    """Compiled programs by bucket key; compiles each key once, counts compiles.

    ``make(key)`` returns ``(jitted_fn, example_args)`` for a key: the function is lowered and
    compiled on those arguments' shapes, then called with real arguments of the same shapes.
    """

    make: Callable[[tuple], tuple[Any, tuple]]
    programs: dict[tuple, Any] = field(default_factory=dict)
    compiles: int = 0

    def get(self, key: tuple) -> Any:
        program = self.programs.get(key)
        if program is None:
            fn, example = self.make(key)
            program = fn.lower(*example).compile()
            self.programs[key] = program
            self.compiles += 1
        return program
