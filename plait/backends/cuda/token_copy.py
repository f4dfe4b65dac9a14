"""Greedy tokens copied to the host without a synchronizing ``.tolist()`` (issue 41's "sample
phase" on accelerators).

A greedy decode step on the GPU used to end in ``logits.max(-1)`` and ``.tolist()``: the host
blocked there until every kernel of the step, the argmax and the copy had run, and only then
returned to the scheduler. Here :class:`AsyncTokenCopy` takes the argmax and the validity test
on the device, packs them into one int64 row (``-1`` for a row whose logits are not all finite),
copies it into a pinned host buffer with ``non_blocking=True`` and records an event after the
copy. The runner returns at once with :class:`PendingGreedyTokens`, a
:class:`~plait.core.forward_batch.GreedyTokens` whose ``tokens`` wait on that event the first
time they are read -- in the batch executor's ``_sample``, the one place that needs them -- so
the host is free until then.

The event and the pinned memory are behind :class:`TokenEvent` and ``pin``: on a CPU (the unit
tests) a tensor op has finished when it returns, so :class:`ReadyEvent` is always ready and the
buffer is ordinary memory; the copy logic is the same.

Pinned buffers form a ring of ``slots``: a buffer is reused ``slots`` copies later, so a
:class:`PendingTokens` must be read before then; reading one that was overwritten raises rather
than returning another step's tokens. The executor reads every step's tokens in that step.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from plait.core.forward_batch import ForwardBatch, GreedyTokens
from plait.core.model_runner import ModelRunner


class TokenEvent(Protocol):
    """What the copy needs of a device event: record after the copy, wait for it."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


class ReadyEvent:
    """A CPU's event: a CPU tensor op is done when it returns."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CudaEvent:
    """``torch.cuda.Event`` recorded on the current stream; ``synchronize`` blocks the calling
    thread only (no device-wide sync)."""

    def __init__(self) -> None:
        self._event = torch.cuda.Event()

    def record(self) -> None:
        self._event.record()

    def synchronize(self) -> None:
        self._event.synchronize()


class PendingTokens:
    """One copy's tokens: ready once its event has completed."""

    def __init__(self, copier: AsyncTokenCopy, slot: int, generation: int, n: int):
        self._copier = copier
        self._slot = slot
        self._generation = generation
        self._n = n
        self._tokens: list[int | None] | None = None

    def get(self) -> list[int | None]:
        """The tokens (``None`` for an invalid row); waits for the copy the first time."""
        if self._tokens is None:
            self._tokens = self._copier.read(self._slot, self._generation, self._n)
        return self._tokens


class PendingGreedyTokens(GreedyTokens):
    """``GreedyTokens`` whose ``tokens`` are read from the host buffer on first access."""

    def __init__(self, pending: PendingTokens):  # no dataclass init: tokens is a property
        self._pending = pending

    @property  # type: ignore[override]
    def tokens(self) -> list[int | None]:
        return self._pending.get()


class AsyncTokenCopy:
    def __init__(
        self,
        device: torch.device | str,
        capacity: int,
        slots: int = 4,
        event_factory: Callable[[], TokenEvent] | None = None,
    ):
        if slots < 1 or capacity < 1:
            raise ValueError(f"capacity and slots must be >= 1, got {capacity}, {slots}")
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self._make_event = event_factory or (CudaEvent if on_gpu else ReadyEvent)
        self._capacity = capacity
        self._buffers = [
            torch.empty(capacity, dtype=torch.int64, pin_memory=on_gpu) for _ in range(slots)
        ]
        self._events: list[TokenEvent | None] = [None] * slots
        self._generations = [0] * slots
        self._next = 0

    def greedy(self, logits: torch.Tensor) -> PendingGreedyTokens:
        """The argmax of each row of ``logits`` ([B, V], on the device), on its way to the
        host; the caller returns without waiting for it."""
        values, indices = logits.max(dim=-1)
        packed = torch.where(torch.isfinite(values), indices, torch.full_like(indices, -1))
        return PendingGreedyTokens(self.copy(packed))

    def copy(self, tokens: torch.Tensor) -> PendingTokens:
        """Start copying ``tokens`` (1-D int64 on the device) to the next pinned buffer."""
        n = tokens.shape[0]
        if n > self._capacity:  # a bigger batch than planned: grow the ring, once
            self._capacity = n
            pin = self.device.type == "cuda"
            self._buffers = [
                torch.empty(n, dtype=torch.int64, pin_memory=pin) for _ in self._buffers
            ]
            self._generations = [g + 1 for g in self._generations]
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        self._generations[slot] += 1
        self._buffers[slot][:n].copy_(tokens, non_blocking=True)
        event = self._make_event()
        event.record()
        self._events[slot] = event
        return PendingTokens(self, slot, self._generations[slot], n)

    def read(self, slot: int, generation: int, n: int) -> list[int | None]:
        """Wait for ``slot``'s copy and read it; a RuntimeError if it was reused since."""
        if self._generations[slot] != generation:
            raise RuntimeError(
                "greedy tokens read after their host buffer was reused: read each step's "
                "tokens before the next copies"
            )
        event = self._events[slot]
        assert event is not None
        event.synchronize()
        return [None if t < 0 else t for t in self._buffers[slot][:n].tolist()]


def install(runner: ModelRunner, copier: AsyncTokenCopy) -> None:
    """Answer ``runner``'s greedy-only batches (``ForwardBatch.greedy_only``) with
    :class:`PendingGreedyTokens` from ``copier`` instead of logits; other batches, and a model
    that answers with its own ``GreedyTokens``, are left as they are."""
    run = runner.run

    def run_async_tokens(batch: ForwardBatch) -> torch.Tensor | GreedyTokens:
        out = run(batch)
        if getattr(batch, "greedy_only", False) and isinstance(out, torch.Tensor):
            return copier.greedy(out)
        return out

    runner.run = run_async_tokens  # type: ignore[method-assign]
