"""The backend contract: every hardware backend, built-in or third party, implements these hooks.

A backend is a plain module registered under the entry-point group ``plait.backends``::

    [project.entry-points."plait.backends"]
    mydevice = "my_package.plait_plugin"

and the module defines functions marked with ``@plait.backends.hookimpl``. The core calls
``plait_backend_info()`` on every plugin to learn names and availability without importing any
device library, then asks only the chosen backend for its pieces. Keep detection cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from plait.core.backend_api import AttentionBackend, BackendInfo, GraphRunner, KVPool
    from plait.core.memory import TokenSlotAllocator

PROJECT = "plait"
ENTRY_POINT_GROUP = "plait.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def plait_backend_info() -> "BackendInfo":
    """Describe this backend: its device name, priority for ``--device auto`` and whether it is
    available here (with the reason when not). Must not import heavy device libraries unless
    that is the only way to tell availability."""


@hookspec(firstresult=True)
def plait_torch_device(device: str) -> Any:
    """The torch device (or array runtime handle) tensors of ``device`` live on."""


@hookspec(firstresult=True)
def plait_create_kv_pool(
    device: str, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
    dtype: Any, page_size: int,
) -> "KVPool":
    """Allocate the paged K/V buffers (one K and one V per layer) for ``device``.

    Slot 0 is reserved for padding: it is written by padded positions and never read as data."""


@hookspec(firstresult=True)
def plait_create_allocator(device: str, num_slots: int, page_size: int) -> "TokenSlotAllocator":
    """The token-slot allocator over the pool's slots (page granularity when page_size > 1)."""


@hookspec(firstresult=True)
def plait_create_attention_backend(device: str, kv_pool: "KVPool", num_heads: int,
                                   num_kv_heads: int, head_dim: int) -> "AttentionBackend":
    """The attention implementation: ``forward_extend`` and ``forward_decode`` over the pool."""


@hookspec(firstresult=True)
def plait_create_graph_runner(device: str, model: Any, max_batch_size: int) -> "GraphRunner | None":
    """Graph capture for decode (CUDA/HIP graphs, jax.jit, NPU graph); ``None`` runs eagerly."""
