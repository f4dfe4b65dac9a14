"""Registers the ROCm backend (entry point ``plait.backends: rocm``).

ROCm builds of torch expose HIP devices through the ``torch.cuda`` API (device ``"cuda"``) and
``torch.version.hip`` names the HIP version; that is the whole detection.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import BackendInfo, KVPool

NAME = "rocm"
PRIORITY = 90


def detect() -> BackendInfo:
    if torch.version.hip is None:
        return BackendInfo(NAME, PRIORITY, False, "torch is not a ROCm build (torch.version.hip "
                                                  "is None)")
    if not torch.cuda.is_available():
        return BackendInfo(NAME, PRIORITY, False, "no HIP device visible to torch")
    if importlib.util.find_spec("triton") is None:
        return BackendInfo(NAME, PRIORITY, False, "triton not installed (pip install plait[rocm])")
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
    from plait.backends.rocm.launch import ROCM_DEFAULT
    return TritonAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim, ROCM_DEFAULT)


@hookimpl
def plait_create_graph_runner(device: str, model: Any, max_batch_size: int):
    if device != NAME:
        return None
    # torch.cuda.CUDAGraph records a HIP graph on ROCm builds.
    from plait.backends.cuda.graph_runner import DecodeGraphRunner, TorchCudaGraphCapture
    return DecodeGraphRunner(model, max_batch_size, "cuda", TorchCudaGraphCapture())
