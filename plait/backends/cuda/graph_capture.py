"""CUDA and HIP graph capture for :class:`~plait.core.graph_runner.DecodeGraphRunner`, which
does the padding and static-buffer bookkeeping for every backend."""

from __future__ import annotations

from typing import Any, Callable

import torch


class TorchCudaGraphCapture:
    """``torch.cuda.CUDAGraph`` capture; on ROCm builds of torch the same API records HIP graphs.

    All sizes share one memory pool, so the graphs together cost about as much memory as the
    largest one.
    """

    def __init__(self, warmup_runs: int = 2):
        self.warmup_runs = warmup_runs
        self._pool = None

    def capture(self, step: Callable[[], Any]) -> Callable[[], Any]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Warm up on a side stream so lazy initialisation (Triton compilation, cuBLAS
        # workspaces) happens outside the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_runs):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()

        def replay() -> Any:
            graph.replay()
            return out

        return replay
