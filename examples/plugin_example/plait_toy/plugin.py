"""Plait hooks for device ``toy``. Each factory answers only for its own device name and
returns None otherwise, so pluggy asks the next plugin."""
from __future__ import annotations

from typing import Any

import torch

from plait.backends import hookimpl
from plait.core.backend_api import BackendInfo, KVPool

NAME = "toy"


@hookimpl
def plait_backend_info() -> BackendInfo:
    # Below the CPU backend (priority 0): device="auto" never picks a toy.
    return BackendInfo(name=NAME, priority=-10, available=True)


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
def plait_create_allocator(device: str, num_slots: int, page_size: int):
    if device != NAME:
        return None
    from plait.core.memory import TokenSlotAllocator
    return TokenSlotAllocator(num_slots, page_size, "cpu")


@hookimpl
def plait_create_attention_backend(device: str, kv_pool: KVPool, num_heads: int,
                                   num_kv_heads: int, head_dim: int):
    if device != NAME:
        return None
    from plait_toy.attention import ToyAttentionBackend
    return ToyAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


@hookimpl
def plait_create_graph_runner(device: str, model: Any, max_batch_size: int) -> None:
    return None  # eager decode
