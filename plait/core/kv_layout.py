"""What one token stores in the paged KV pool, as the model declares it.

The pool's shape is the model's to say: a Llama-style model stores a K and a V of
``[heads, head_dim]`` per token and layer (:func:`heads_layout`, the default); DeepSeek's
multi-head latent attention stores one compressed latent of ``kv_lora_rank + qk_rope_head_dim``
values (:func:`latent_layout`), far smaller. The engine sizes the pool from
:meth:`KVCacheLayout.bytes_per_token` and creates it with :func:`create_kv_pool`.

A model loader declares its layout with an optional ``kv_layout(hf_config, tp_size, tp_rank)``
attribute (:func:`declared_layout` reads it); a loader without one gets :func:`heads_layout`.
The core never imports ``plait.models``: the loader is handed in by the composition root.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from plait.core.attention_api import KVPool

KINDS = ("kv", "latent")


@dataclass(frozen=True, kw_only=True)
class KVCacheLayout:
    """One rank's per-token, per-layer KV storage.

    ``kind="kv"``: two buffers (K and V), each ``[heads, head_dim]``.
    ``kind="latent"``: one buffer ``[1, head_dim]`` whose first ``latent_rank`` values are the
    compressed latent (attention's value, and with the rest its key) and whose remaining
    ``head_dim - latent_rank`` values are the shared RoPE key part.
    """

    kind: Literal["kv", "latent"]
    num_layers: int
    heads: int
    head_dim: int
    latent_rank: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"KVCacheLayout kind must be one of {KINDS}, got {self.kind!r}")
        if min(self.num_layers, self.heads, self.head_dim) < 1:
            raise ValueError(f"KVCacheLayout sizes must be positive: {self}")
        if self.kind == "latent" and (self.heads != 1 or not 0 < self.latent_rank < self.head_dim):
            raise ValueError(
                f"a latent layout has heads=1 and 0 < latent_rank < head_dim, got {self}"
            )

    @property
    def buffers_per_layer(self) -> int:
        return 2 if self.kind == "kv" else 1

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes one token occupies in every layer of the pool (the sizing rule)."""
        elem = torch.tensor([], dtype=dtype).element_size()
        return self.buffers_per_layer * self.num_layers * self.heads * self.head_dim * elem


def heads_layout(hf_config: Any, tp_size: int = 1, tp_rank: int = 0) -> KVCacheLayout:
    """K and V per KV head of rank ``tp_rank``'s shard (``plait.core.tp.sharding``): the
    layout of every model that declares none."""
    from plait.core.tp.sharding import shard_heads

    shard = shard_heads(
        hf_config.num_attention_heads, hf_config.num_key_value_heads, tp_size, tp_rank
    )
    return KVCacheLayout(
        kind="kv",
        num_layers=hf_config.num_hidden_layers,
        heads=shard.num_kv_heads,
        head_dim=head_dim_of(hf_config),
    )


def head_dim_of(config: Any) -> int:
    """Each attention head's width: the config's ``head_dim`` where it sets one (Mistral,
    Qwen3), else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def latent_layout(*, num_layers: int, kv_lora_rank: int, rope_dim: int) -> KVCacheLayout:
    """Multi-head latent attention's layout: the latent plus the shared RoPE key per token."""
    return KVCacheLayout(
        kind="latent",
        num_layers=num_layers,
        heads=1,
        head_dim=kv_lora_rank + rope_dim,
        latent_rank=kv_lora_rank,
    )


def declared_layout(loader: Any, hf_config: Any, tp_size: int, tp_rank: int) -> KVCacheLayout:
    """The layout ``loader`` declares for rank ``tp_rank`` of ``tp_size`` (its ``kv_layout``
    attribute), else :func:`heads_layout`. A loader refuses a ``tp_size`` it cannot shard
    with a ValueError naming why."""
    declare = getattr(loader, "kv_layout", None)
    if declare is None:
        return heads_layout(hf_config, tp_size, tp_rank)
    layout = declare(hf_config, tp_size, tp_rank)
    if not isinstance(layout, KVCacheLayout):
        raise ValueError(f"{loader!r}.kv_layout returned {layout!r}, not a KVCacheLayout")
    return layout


def largest_bytes_per_token(loader: Any, hf_config: Any, tp_size: int, dtype: torch.dtype) -> int:
    """The largest rank's bytes per token: a per-rank budget sized by it gives every rank
    the same number of slots."""
    return max(
        declared_layout(loader, hf_config, tp_size, r).bytes_per_token(dtype)
        for r in range(tp_size)
    )


def create_kv_pool(
    backend: Any,
    layout: KVCacheLayout,
    num_slots: int,
    dtype: torch.dtype,
    page_size: int,
) -> KVPool:
    """The pool for ``layout`` from ``backend`` (a :class:`~plait.core.backend_api.Backend`):
    its ``create_kv_pool`` for K/V heads,
    ``create_latent_kv_pool`` for a latent."""
    if layout.kind == "latent":
        return backend.create_latent_kv_pool(
            layout=layout, num_slots=num_slots, dtype=dtype, page_size=page_size
        )
    return backend.create_kv_pool(
        num_slots=num_slots,
        num_layers=layout.num_layers,
        num_kv_heads=layout.heads,
        head_dim=layout.head_dim,
        dtype=dtype,
        page_size=page_size,
    )
