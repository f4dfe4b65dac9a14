"""The core's contract for multi-head latent attention (DeepSeek-V2/V3): the latent pool and
the attention over it.

MLA compresses each token's keys and values into one latent ``c`` (``kv_lora_rank`` values,
after ``kv_a_layernorm``) plus a RoPE key part shared by all heads (``rope_dim`` values). The
pool stores exactly that, ``[latent | rope]`` per token and layer. Attention runs in the
absorbed form: the model folds ``W_UK`` into the query (``q_nope @ W_UK`` lands in latent
space), so each head's score is ``q_latent . c + q_rope . k_rope`` over the stored rows, and
its output is the probability-weighted sum of the ``c`` rows, which the model multiplies by
``W_UV``. That is multi-query attention with one shared head whose value is the key's first
``kv_lora_rank`` channels: what :class:`MLAAttentionBackend` implements.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from plait.core.attention_api import KVPool

if TYPE_CHECKING:
    from plait.core.forward_batch import ForwardBatch
    from plait.core.kv_layout import KVCacheLayout


class LatentKVPool(KVPool):
    """``latent_buffers[layer][slot] -> [1, kv_lora_rank + rope_dim]``; slot 0 is padding.

    ``k_buffers`` are the latent buffers themselves (the key is the whole row) and
    ``v_buffers`` views of their first ``kv_lora_rank`` channels (the value), so code that
    reads a K/V pool's buffers sees the latent's; nothing is stored twice.
    """

    def __init__(
        self,
        layout: KVCacheLayout,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int = 1,
    ):
        size = self._set_fields(layout, num_slots, dtype, device, page_size)
        self.latent_buffers = [
            torch.zeros(size, 1, layout.head_dim, dtype=dtype, device=device)
            for _ in range(layout.num_layers)
        ]
        self.k_buffers = self.latent_buffers
        self.v_buffers = [b[..., : layout.latent_rank] for b in self.latent_buffers]

    def _set_fields(
        self,
        layout: KVCacheLayout,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
        page_size: int,
    ) -> int:
        """The pool's fields (a subclass storing the rows differently sets them here too);
        returns the rows each layer's buffers need."""
        if layout.kind != "latent":
            raise ValueError(
                f"{type(self).__name__} needs a latent layout, got kind={layout.kind!r}"
            )
        self.layout = layout
        self.num_slots = num_slots
        self.page_size = page_size
        self.num_layers = layout.num_layers
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv_lora_rank = layout.latent_rank
        return num_slots + page_size  # slot/page 0 (padding) exists even when page_size > 1

    def set_latent(self, layer_id: int, loc: torch.Tensor, latent: torch.Tensor) -> None:
        """Store ``latent`` [T, head_dim] at slots ``loc``."""
        self.latent_buffers[layer_id][loc] = latent.to(self.dtype).unsqueeze(1)

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        raise TypeError("a latent pool stores latents (set_latent), not per-head K and V")


class MLAAttentionBackend(ABC):
    """Absorbed-form attention over a :class:`LatentKVPool`.

    ``forward(q, latent, layer_id, batch)``: ``q`` [T, H, head_dim] is each head's query in
    latent space followed by its rotated RoPE part; ``latent`` [T, head_dim] the new tokens'
    ``[c | k_rope]``, written to ``batch.out_cache_loc`` first. Returns [T, H, kv_lora_rank]:
    per head, softmax(scale * q . rows) over the request's visible rows (causal, its cached
    prefix included) times the rows' first ``kv_lora_rank`` channels.
    """

    def __init__(self, kv_pool: LatentKVPool, num_heads: int, scale: float):
        self.kv_pool = kv_pool
        self.num_heads = num_heads
        self.head_dim = kv_pool.layout.head_dim
        self.kv_lora_rank = kv_pool.kv_lora_rank
        self.scale = scale
        self.sliding_windows: tuple[int | None, ...] = ()

    def set_sliding_windows(self, windows: tuple[int | None, ...]) -> None:
        if any(w is not None for w in windows):
            raise ValueError("multi-head latent attention does not support sliding windows")

    def set_layer_scales(self, scales: tuple[float, ...]) -> None:
        """The softmax scale is the model's one ``scale``: per-layer scales are refused."""
        if scales:
            raise ValueError("multi-head latent attention does not support per-layer scales")

    def set_logit_softcaps(self, caps: tuple[float | None, ...]) -> None:
        if any(c is not None for c in caps):
            raise ValueError("multi-head latent attention does not support logit soft-capping")

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Precompute per-batch metadata once, before the layers run (optional)."""

    def forward(
        self, q: torch.Tensor, latent: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        self.kv_pool.set_latent(layer_id, batch.out_cache_loc, latent)
        if batch.is_decode:
            return self.forward_decode(q, layer_id, batch)
        return self.forward_extend(q, layer_id, batch)

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """New tokens attend to their request's cached rows and causally to each other."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """One query per request over all of its rows (the new token's included)."""
