"""The attention side of the backend contract: the paged KV pool and the attention backend
that reads and writes it. Split from :mod:`plait.core.backend_api` (which re-exports both) so
the contract's two halves, building a backend and attending over its pool, read apart."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from plait.core.forward_batch import ForwardBatch


class KVPool:
    """Per-layer K and V buffers indexed by token slot: ``k_buffers[layer][slot] -> [Hkv, D]``.

    Slot 0 is reserved for padding; valid slots are ``1..num_slots``.
    """

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int = 1,
    ):
        self.num_slots = num_slots
        self.page_size = page_size
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = torch.device(device)
        # +page_size so that slot/page 0 (padding) exists even when page_size > 1.
        size = num_slots + page_size
        self.k_buffers = [
            torch.zeros(size, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v_buffers = [
            torch.zeros(size, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer_id][loc] = k.to(self.dtype)
        self.v_buffers[layer_id][loc] = v.to(self.dtype)


class AttentionBackend(ABC):
    """Attention over the paged pool. ``q``: [T, Hq, D]; ``k``/``v``: [T, Hkv, D] for the new
    tokens. Implementations write k/v to ``batch.out_cache_loc`` then attend.

    ``sliding_windows[layer_id]`` is that layer's sliding window W (the query at position p
    sees keys ``p - W + 1 .. p``; ``plait.models.sliding_window``), None for full attention; an
    empty tuple means no layer has one. The model runner sets it once, from the model, through
    :meth:`set_sliding_windows`, which refuses windows an implementation cannot apply
    (``supports_sliding_window`` False) instead of letting it attend to every earlier token.
    """

    #: whether ``forward_extend``/``forward_decode`` honour ``sliding_windows``
    supports_sliding_window: ClassVar[bool] = False

    def __init__(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv_pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_windows: tuple[int | None, ...] = ()

    def set_sliding_windows(self, windows: tuple[int | None, ...]) -> None:
        """Attend through layer i's window ``windows[i]`` from now on (before any forward).
        ValueError, naming the window, where this implementation cannot."""
        if any(w is not None for w in windows) and not self.supports_sliding_window:
            raise ValueError(
                f"{describe_windows(windows)} is not supported by the "
                f"{type(self).__name__} attention backend: it would attend to "
                "every earlier token and diverge from the model past the window"
            )
        self.sliding_windows = tuple(windows)

    def window(self, layer_id: int) -> int | None:
        """Layer ``layer_id``'s sliding window, None for full attention."""
        return self.sliding_windows[layer_id] if self.sliding_windows else None

    def init_forward_metadata(self, batch: "ForwardBatch") -> None:
        """Precompute per-batch metadata once, before the layers run (optional)."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        batch: "ForwardBatch",
    ) -> torch.Tensor:
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


def describe_windows(windows: tuple[int | None, ...]) -> str:
    """``"sliding_window=W"`` (plus which layers, when not all) for error messages."""
    used = sorted({w for w in windows if w is not None})
    layers = [i for i, w in enumerate(windows) if w is not None]
    text = f"sliding_window={used[0] if len(used) == 1 else used}"
    if len(layers) != len(windows):
        text += f" (layers {layers[0]}..{layers[-1]})"
    return text
