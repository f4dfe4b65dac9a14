"""Registers the Ascend NPU backend (entry point ``plait.backends: npu``).

Detection must work, and say why, on machines without torch_npu: it looks the module up
without importing it, and imports it only when it is installed.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import BackendInfo, KVPool

NAME = "npu"
PRIORITY = 70


def detect() -> BackendInfo:
    if importlib.util.find_spec("torch_npu") is None:
        return BackendInfo(NAME, PRIORITY, False, "torch_npu not installed")
    try:
        importlib.import_module("torch_npu")  # registers torch.npu
    except Exception as e:  # a broken CANN install raises all sorts of errors
        return BackendInfo(NAME, PRIORITY, False, f"torch_npu failed to import: {e}")
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return BackendInfo(NAME, PRIORITY, False, "no Ascend NPU visible to torch_npu")
    return BackendInfo(NAME, PRIORITY, True)


@hookimpl
def plait_backend_info() -> BackendInfo:
    return detect()


@hookimpl
def plait_torch_device(device: str) -> torch.device | None:
    if device != NAME:
        return None
    importlib.import_module("torch_npu")  # the "npu" device type exists once it is imported
    return torch.device("npu")


@hookimpl
def plait_create_kv_pool(device: str, num_slots: int, num_layers: int, num_kv_heads: int,
                         head_dim: int, dtype: Any, page_size: int) -> KVPool | None:
    if device != NAME:
        return None
    return KVPool(num_slots, num_layers, num_kv_heads, head_dim, dtype, "npu", page_size)


@hookimpl
def plait_create_allocator(device: str, num_slots: int, page_size: int):
    if device != NAME:
        return None
    from plait.core.memory import TokenSlotAllocator
    return TokenSlotAllocator(num_slots, page_size, "npu")


@hookimpl
def plait_create_attention_backend(device: str, kv_pool: KVPool, num_heads: int,
                                   num_kv_heads: int, head_dim: int):
    if device != NAME:
        return None
    from plait.backends.npu.attention import AscendAttentionBackend
    return AscendAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


@hookimpl
def plait_create_graph_runner(device: str, model: Any, max_batch_size: int) -> None:
    # Eager for now: FIA takes sequence lengths as host lists, which a captured NPU graph would
    # freeze at capture time (updating them needs torch_npu's graph task-update API).
    return None
