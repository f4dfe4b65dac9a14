"""Registers the CPU backend (entry point ``plait.backends: cpu``)."""
from __future__ import annotations

from typing import Any

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import BackendInfo, KVPool
from plait.core.memory import TokenSlotAllocator

NAME = "cpu"


@hookimpl
def plait_backend_info() -> BackendInfo:
    return BackendInfo(name=NAME, priority=0, available=True)


@hookimpl
def plait_torch_device(device: str) -> torch.device | None:
    return torch.device("cpu") if device == NAME else None


@hookimpl
def plait_create_kv_pool(device: str, num_slots: int, num_layers: int, num_kv_heads: int,
                         head_dim: int, dtype: Any, page_size: int) -> KVPool | None:
    if device != NAME:
        return None
    return KVPool(num_slots, num_layers, num_kv_heads, head_dim, dtype, "cpu", page_size)


@hookimpl
def plait_create_allocator(device: str, num_slots: int, page_size: int) -> TokenSlotAllocator | None:
    return TokenSlotAllocator(num_slots, page_size, "cpu") if device == NAME else None


@hookimpl
def plait_create_attention_backend(device: str, kv_pool: KVPool, num_heads: int,
                                   num_kv_heads: int, head_dim: int):
    if device != NAME:
        return None
    from plait.backends.cpu.attention import TorchAttentionBackend
    return TorchAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


@hookimpl
def plait_create_graph_runner(device: str, model: Any, max_batch_size: int) -> None:
    return None  # CPU runs eagerly
