"""Decode "graphs" on TPU: ``jax.jit`` compiles once per input shape, so capture is padding
every decode batch to a few fixed sizes and warming the compile cache for each."""
from __future__ import annotations

from typing import Any, Callable


class JitBucketCapture:
    """A :class:`~plait.core.graph_runner.GraphCapture` for jitted kernels: running the
    step once compiles every kernel for this bucket; replays run it again, compile-free."""

    def capture(self, step: Callable[[], Any]) -> Callable[[], Any]:
        step()
        return step
