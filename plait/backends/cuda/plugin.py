"""Registers the CUDA backend (entry point ``plait.backends: cuda``).

Detection only asks torch (already imported by the core) and looks for triton without
importing it; the kernels are imported when an attention backend is created.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import BackendInfo, KVPool

NAME = "cuda"
PRIORITY = 100


def detect() -> BackendInfo:
    if torch.version.hip is not None:
        return BackendInfo(NAME, PRIORITY, False, "this torch is a ROCm build (use device='rocm')")
    if not torch.cuda.is_available():
        return BackendInfo(NAME, PRIORITY, False, "torch.cuda.is_available() is False")
    if importlib.util.find_spec("triton") is None:
        return BackendInfo(NAME, PRIORITY, False, "triton not installed (pip install plait[cuda])")
    return BackendInfo(NAME, PRIORITY, True)


@hookimpl
def plait_backend_info() -> BackendInfo:
    return detect()


@hookimpl
def plait_torch_device(device: str) -> torch.device | None:
    return torch.device("cuda") if device == NAME else None


@hookimpl
def plait_create_kv_pool(device: str, num_slots: int, num_layers: int, num_kv_heads: int,
                         head_dim: int, dtype: Any, page_size: int) -> KVPool | None:
    if device != NAME:
        return None
    return KVPool(num_slots, num_layers, num_kv_heads, head_dim, dtype, "cuda", page_size)


@hookimpl
def plait_create_allocator(device: str, num_slots: int, page_size: int):
    if device != NAME:
        return None
    from plait.core.memory import TokenSlotAllocator
    return TokenSlotAllocator(num_slots, page_size, "cuda")


@hookimpl
def plait_create_attention_backend(device: str, kv_pool: KVPool, num_heads: int,
                                   num_kv_heads: int, head_dim: int):
    if device != NAME:
        return None
    from plait.backends.cuda.attention import TritonAttentionBackend
    from plait.backends.cuda.launch import CUDA_DEFAULT
    return TritonAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim, CUDA_DEFAULT)


@hookimpl
def plait_create_graph_runner(device: str, model: Any, max_batch_size: int):
    if device != NAME:
        return None
    from plait.backends.cuda.graph_runner import DecodeGraphRunner, TorchCudaGraphCapture
    return DecodeGraphRunner(model, max_batch_size, "cuda", TorchCudaGraphCapture())
