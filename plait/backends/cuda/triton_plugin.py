"""The hook implementations shared by the Triton backends (CUDA and ROCm).

Both run the same kernels on a torch ``"cuda"`` device (ROCm builds expose HIP that way) and
differ only in detection and launch parameters, so each registers an instance of this class.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import BackendInfo, KVPool


class TritonBackendPlugin:
    def __init__(self, name: str, detect: Callable[[], BackendInfo], launch: Callable[[], Any]):
        self.name = name
        self.detect = detect
        self.launch = launch  # returns the launch parameters; called once a backend is made

    @hookimpl
    def plait_backend_info(self) -> BackendInfo:
        return self.detect()

    @hookimpl
    def plait_torch_device(self, device: str) -> torch.device | None:
        return torch.device("cuda") if device == self.name else None

    @hookimpl
    def plait_create_kv_pool(self, device: str, num_slots: int, num_layers: int,
                             num_kv_heads: int, head_dim: int, dtype: Any,
                             page_size: int) -> KVPool | None:
        if device != self.name:
            return None
        return KVPool(num_slots, num_layers, num_kv_heads, head_dim, dtype, "cuda", page_size)

    @hookimpl
    def plait_create_allocator(self, device: str, num_slots: int, page_size: int):
        if device != self.name:
            return None
        from plait.core.memory import TokenSlotAllocator
        return TokenSlotAllocator(num_slots, page_size, "cuda")

    @hookimpl
    def plait_create_attention_backend(self, device: str, kv_pool: KVPool, num_heads: int,
                                       num_kv_heads: int, head_dim: int):
        if device != self.name:
            return None
        from plait.backends.cuda.attention import TritonAttentionBackend
        return TritonAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim, self.launch())

    @hookimpl
    def plait_create_graph_runner(self, device: str, model: Any, max_batch_size: int):
        if device != self.name:
            return None
        # torch.cuda.CUDAGraph records a HIP graph on ROCm builds.
        from plait.backends.cuda.graph_runner import DecodeGraphRunner, TorchCudaGraphCapture
        return DecodeGraphRunner(model, max_batch_size, "cuda", TorchCudaGraphCapture())
