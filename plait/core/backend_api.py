"""What the core expects from a backend, as plain Python types.

The core builds a :class:`~plait.core.forward_batch.ForwardBatch` and hands it, with q/k/v, to
an :class:`AttentionBackend`; everything device-specific lives behind these classes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from plait.core.forward_batch import ForwardBatch


@dataclass(frozen=True)
class BackendInfo:
    """A backend's self-description; ``priority`` orders ``--device auto`` (higher wins)."""

    name: str
    priority: int
    available: bool
    reason: str = ""  # why not available (empty when available)


class KVPool:
    """Per-layer K and V buffers indexed by token slot: ``k_buffers[layer][slot] -> [Hkv, D]``.

    Slot 0 is reserved for padding; valid slots are ``1..num_slots``.
    """

    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, page_size: int = 1):
        self.num_slots = num_slots
        self.page_size = page_size
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = torch.device(device)
        # +page_size so that slot/page 0 (padding) exists even when page_size > 1.
        size = num_slots + page_size
        self.k_buffers = [torch.zeros(size, num_kv_heads, head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(size, num_kv_heads, head_dim, dtype=dtype, device=device)
                          for _ in range(num_layers)]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)

    def bytes_per_token(self) -> int:
        k = self.k_buffers[0]
        return 2 * self.num_layers * k.shape[1] * k.shape[2] * k.element_size()


class AttentionBackend(ABC):
    """Attention over the paged pool. ``q``: [T, Hq, D]; ``k``/``v``: [T, Hkv, D] for the new
    tokens. Implementations write k/v to ``batch.out_cache_loc`` then attend."""

    def __init__(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv_pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def init_forward_metadata(self, batch: "ForwardBatch") -> None:
        """Precompute per-batch metadata once, before the layers run (optional)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                batch: "ForwardBatch") -> torch.Tensor:
        self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        if batch.is_decode:
            return self.forward_decode(q, layer_id, batch)
        return self.forward_extend(q, layer_id, batch)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: "ForwardBatch") -> torch.Tensor:
        """New tokens attend to their request's cached prefix and causally to each other."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: "ForwardBatch") -> torch.Tensor:
        """One query per request over all of its KV (the new token's included)."""


class GraphRunner(ABC):
    """Captures decode for fixed batch sizes and replays it with padding."""

    @abstractmethod
    def can_run(self, batch: "ForwardBatch") -> bool: ...

    @abstractmethod
    def replay(self, batch: "ForwardBatch", run: Callable[["ForwardBatch"], Any]) -> Any: ...
