"""Qwen3 (``Qwen3ForCausalLM``): Llama's layout plus an RMSNorm over each query and key head
(``q_norm``/``k_norm``, weights of size ``head_dim``) applied before RoPE, and ``head_dim``
taken from the config rather than ``hidden_size / heads``.

:class:`QKNormAttention` is the reusable piece: any architecture whose attention normalises
q and k per head before rotating them (Qwen3-MoE) builds its layers with it. The per-head norm
weights are the same on every tensor-parallel rank, so sharding is Llama's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from plait.core.forward_batch import ForwardBatch
from plait.core.tp.group import TPGroup
from plait.models.llama import (
    Attention,
    DecoderLayer,
    LlamaForCausalLM,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
)

if TYPE_CHECKING:
    from plait.core.backend_api import AttentionBackend


class QKNormAttention(Attention):
    """Llama attention whose query and key heads each pass an RMSNorm (over ``head_dim``,
    the config's ``rms_norm_eps``) between the projection and RoPE, as transformers'
    ``Qwen3Attention`` does."""

    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup):
        super().__init__(config, layer_id, rotary, tp)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        attn: AttentionBackend,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        t = x.shape[0]
        q = self.q_norm(q.view(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rope)
        o = attn.forward(q, k, v, self.layer_id, batch)
        return self.o_proj(o.reshape(t, -1))


class Qwen3DecoderLayer(DecoderLayer):
    attention_cls = QKNormAttention


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3's dense model: Llama's with :class:`QKNormAttention` in every layer (its sliding
    window, when ``use_sliding_window``, follows ``layer_types`` as Qwen2's does)."""

    layer_cls = Qwen3DecoderLayer
