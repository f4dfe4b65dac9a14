"""Decode graph capture with padding to a few fixed batch sizes.

A graph replays the exact kernels it recorded, on the exact memory it recorded them on. So the
runner keeps static input buffers (ids, positions, slots, request rows, lengths), copies each
decode batch into the smallest captured size that fits, pads the rest, replays and returns the
first ``batch_size`` rows of the outputs.

Padded rows are harmless by construction: they write their K/V to slot 0 (reserved for
padding), read row 0 of ``req_to_token`` with ``seq_len = 1`` and their outputs are dropped.

This module is device-neutral: how a graph is recorded is a :class:`GraphCapture` that each
backend supplies (CUDA and HIP graphs in ``plait.backends.cuda.graph_capture``, ``jax.jit``
shape buckets in ``plait.backends.tpu.graph``), and :class:`EagerCapture` just reruns the step
on the static buffers, so the padding logic can be tested on a CPU.

The static batch's host lists (``seq_lens_cpu``...) are refreshed too, which is enough for
captures that rerun the step; a CUDA graph never re-reads them, so kernels inside a captured
step must take lengths from tensors only (the Triton decode kernel does).
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Protocol

import torch

from plait.core.backend_api import GraphRunner
from plait.core.forward_batch import ForwardBatch

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class GraphCapture(Protocol):
    def capture(self, step: Callable[[], Any]) -> Callable[[], Any]:
        """Record ``step`` (a closure over static buffers); return a function replaying it."""


class EagerCapture:
    """Replays by calling the step again: no graph, same padding. For tests and debugging."""

    def capture(self, step: Callable[[], Any]) -> Callable[[], Any]:
        return step


class DecodeGraphRunner(GraphRunner):
    """Captures decode lazily, once per padded batch size, and replays it."""

    def __init__(
        self,
        model: Any,
        max_batch_size: int,
        device: torch.device | str,
        capture: GraphCapture,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        self.capture_api = capture
        sizes = sorted({s for s in batch_sizes if s < max_batch_size} | {max_batch_size})
        self.batch_sizes = tuple(sizes)
        self._replays: dict[int, Callable[[], Any]] = {}
        self._views: dict[int, ForwardBatch] = {}
        self._static: ForwardBatch | None = None  # buffers of max_batch_size rows
        self._req_to_token: torch.Tensor | None = None

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and 0 < batch.batch_size <= self.max_batch_size

    def padded_size(self, batch_size: int) -> int:
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch_size)]

    def replay(self, batch: ForwardBatch, run: Callable[[ForwardBatch], Any]) -> Any:
        if not self.can_run(batch):
            raise ValueError(
                f"batch (decode={batch.is_decode}, size={batch.batch_size}) is "
                f"not replayable; max_batch_size={self.max_batch_size}"
            )
        self._bind_table(batch.req_to_token)
        bs, padded = batch.batch_size, self.padded_size(batch.batch_size)
        static = self._views.get(padded) or self._views.setdefault(padded, self._view(padded))
        self._fill(batch, static)
        replay = self._replays.get(padded)
        if replay is None:
            replay = self.capture_api.capture(lambda: run(static))
            self._replays[padded] = replay
        return _first_rows(replay(), bs, padded)

    def stats(self) -> dict[str, Any]:
        """The padded sizes captured so far, plus the capture API's own counters (the CPU's
        ``graph_compiles``), when it has a ``stats()``."""
        extra = getattr(self.capture_api, "stats", None)
        return {"captured_batch_sizes": sorted(self._replays), **(extra() if extra else {})}

    def _bind_table(self, req_to_token: torch.Tensor) -> None:
        # The graphs read the table through its address: it must be the same tensor every step.
        if self._req_to_token is None:
            self._req_to_token = req_to_token
            self._static = _static_buffers(self.max_batch_size, req_to_token, self.device)
        elif req_to_token is not self._req_to_token:
            raise ValueError(
                "req_to_token changed between decode steps; graphs captured on the "
                "old table cannot be replayed"
            )

    def _fill(self, batch: ForwardBatch, static: ForwardBatch) -> None:
        bs, pad_rows = batch.batch_size, static.batch_size - batch.batch_size
        for name, pad in (
            ("input_ids", 0),
            ("positions", 0),
            ("out_cache_loc", 0),
            ("req_pool_indices", 0),
            ("seq_lens", 1),
            ("prefix_lens", 0),
        ):
            dst = getattr(static, name)  # a view of the max-size buffer: writes land there
            dst[:bs].copy_(getattr(batch, name), non_blocking=True)
            dst[bs:].fill_(pad)
        static.seq_lens_cpu = list(batch.seq_lens_cpu) + [1] * pad_rows
        static.prefix_lens_cpu = list(batch.prefix_lens_cpu) + [0] * pad_rows

    def _view(self, padded: int) -> ForwardBatch:
        s = self._static
        assert s is not None, "_bind_table runs before the first view"
        return ForwardBatch(
            is_decode=True,
            input_ids=s.input_ids[:padded],
            positions=s.positions[:padded],
            out_cache_loc=s.out_cache_loc[:padded],
            req_pool_indices=s.req_pool_indices[:padded],
            seq_lens=s.seq_lens[:padded],
            prefix_lens=s.prefix_lens[:padded],
            extend_lens=s.extend_lens[:padded],
            req_to_token=s.req_to_token,
            logits_rows=s.logits_rows[:padded],
            seq_lens_cpu=[1] * padded,
            prefix_lens_cpu=[0] * padded,
            extend_lens_cpu=[1] * padded,
        )


def _static_buffers(n: int, req_to_token: torch.Tensor, device: torch.device) -> ForwardBatch:
    def zeros() -> torch.Tensor:
        return torch.zeros(n, dtype=torch.int64, device=device)

    return ForwardBatch(
        is_decode=True,
        input_ids=zeros(),
        positions=zeros(),
        out_cache_loc=zeros(),
        req_pool_indices=zeros(),
        seq_lens=torch.ones(n, dtype=torch.int64, device=device),
        prefix_lens=zeros(),
        extend_lens=torch.ones(n, dtype=torch.int64, device=device),
        req_to_token=req_to_token,
        logits_rows=torch.arange(n, device=device),
        seq_lens_cpu=[1] * n,
        prefix_lens_cpu=[0] * n,
        extend_lens_cpu=[1] * n,
    )


def _first_rows(out: Any, bs: int, padded: int) -> Any:
    """The real rows of every tensor output (tensors, tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return out[:bs] if out.dim() and out.shape[0] == padded else out
    if isinstance(out, (tuple, list)):
        return type(out)(_first_rows(o, bs, padded) for o in out)
    if isinstance(out, dict):
        return {k: _first_rows(v, bs, padded) for k, v in out.items()}
    return out
