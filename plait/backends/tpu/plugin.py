"""Registers the TPU backend (entry point ``plait.backends: tpu``).

The model runs in torch on the host; attention runs as Pallas kernels on the TPU over a KV pool
that lives there (jax arrays), with q/k/v crossing by DLPack.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import BackendInfo

NAME = "tpu"
PRIORITY = 80


def detect() -> BackendInfo:
    if importlib.util.find_spec("jax") is None:
        return BackendInfo(NAME, PRIORITY, False, "jax not installed (pip install plait[tpu])")
    if importlib.util.find_spec("libtpu") is None:
        # Without libtpu jax cannot reach a TPU; answering here avoids importing jax.
        return BackendInfo(NAME, PRIORITY, False, "no TPU runtime (libtpu not installed)")
    try:
        import jax
        jax.devices("tpu")
    except RuntimeError as e:
        return BackendInfo(NAME, PRIORITY, False, f"jax sees no TPU ({e})")
    return BackendInfo(NAME, PRIORITY, True)


def _jax_device() -> Any:
    import jax
    return jax.devices("tpu")[0]


@hookimpl
def plait_backend_info() -> BackendInfo:
    return detect()


@hookimpl
def plait_torch_device(device: str) -> torch.device | None:
    return torch.device("cpu") if device == NAME else None  # torch tensors stay on the host


@hookimpl
def plait_create_kv_pool(device: str, num_slots: int, num_layers: int, num_kv_heads: int,
                         head_dim: int, dtype: Any, page_size: int):
    if device != NAME:
        return None
    from plait.backends.tpu.attention import JaxKVPool
    return JaxKVPool(num_slots, num_layers, num_kv_heads, head_dim, dtype, page_size,
                     _jax_device())


@hookimpl
def plait_create_allocator(device: str, num_slots: int, page_size: int):
    if device != NAME:
        return None
    from plait.core.memory import TokenSlotAllocator
    return TokenSlotAllocator(num_slots, page_size, "cpu")  # slot bookkeeping is host work


@hookimpl
def plait_create_attention_backend(device: str, kv_pool: Any, num_heads: int,
                                   num_kv_heads: int, head_dim: int):
    if device != NAME:
        return None
    from plait.backends.tpu.attention import PallasAttentionBackend
    return PallasAttentionBackend(kv_pool, num_heads, num_kv_heads, head_dim)


@hookimpl
def plait_create_graph_runner(device: str, model: Any, max_batch_size: int):
    if device != NAME:
        return None
    from plait.backends.cuda.graph_runner import DecodeGraphRunner
    from plait.backends.tpu.graph import JitBucketCapture
    return DecodeGraphRunner(model, max_batch_size, "cpu", JitBucketCapture())
