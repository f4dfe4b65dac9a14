"""Gemma 2 and Gemma 3 text (``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``) over Plait's paged
KV cache, op for op as transformers computes them in float32.

What differs from Llama, all read from the config:
- RMSNorm scales by ``1 + w`` (weights stored as offsets from one), computed in float32;
  every layer has four: before and after attention, before and after the MLP.
- The embedding is multiplied by ``sqrt(hidden_size)``; the MLP is GeGLU (tanh-approximated
  GELU on the gate).
- Attention scales scores by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``, and
  Gemma 2 caps them (``attn_logit_softcapping``: ``c * tanh(s / c)``): both are declared to
  the attention backend (``attention_scales``, ``attention_softcaps``), which refuses what it
  cannot honour. The final logits are capped too (``final_logit_softcapping``).
- ``layer_types`` alternates sliding-window and global layers (``sliding_windows``); Gemma 3
  gives the two kinds their own RoPE base (``rope_parameters[layer_type]``) and normalises
  q and k per head (its ``q_norm``/``k_norm``, ``1 + w`` too) before RoPE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.core.forward_batch import ForwardBatch
from plait.core.tp.group import TPGroup
from plait.core.model_runner import head_dim_of
from plait.models.llama import (
    MLP,
    Attention,
    LlamaForCausalLM,
    RotaryEmbedding,
    apply_rotary,
    rope_tables,
)

if TYPE_CHECKING:
    from plait.core.backend_api import AttentionBackend

FULL = "full_attention"


def layer_types(config: Any) -> list[str]:
    """Each layer's kind, ``"sliding_attention"`` or ``"full_attention"`` (transformers
    derives ``layer_types`` from Gemma 3's ``sliding_window_pattern``)."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else [FULL] * config.num_hidden_layers


class GemmaRMSNorm(nn.Module):
    """``norm(x) * (1 + w)`` in float32, cast back after the product (not before, as Llama)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class GemmaAttention(Attention):
    """Llama's sharded attention; Gemma 3's q/k heads pass a :class:`GemmaRMSNorm` first."""

    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup):
        super().__init__(config, layer_id, rotary, tp)
        self.qk_norm = config.model_type == "gemma3_text"
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        attn: AttentionBackend,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        t = x.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, *rope)
        o = attn.forward(q, k, v.view(t, self.num_kv_heads, self.head_dim), self.layer_id, batch)
        return self.o_proj(o.reshape(t, -1))


class GegluMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup):
        super().__init__()
        if config.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(
                f"hidden_activation={config.hidden_activation!r} is not supported "
                "(Gemma's GeGLU uses gelu_pytorch_tanh)"
            )
        self.self_attn = GemmaAttention(config, layer_id, rotary, tp)
        self.mlp = GegluMLP(config, tp)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        attn: AttentionBackend,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), batch, attn, rope)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 and Gemma 3 text: see the module docstring for what each config field does."""

    layer_cls = GemmaDecoderLayer

    def __init__(self, config: Any, max_positions: int, tp: TPGroup = TPGroup()):
        super().__init__(config, max_positions, tp)
        n = config.num_hidden_layers
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layer_types = layer_types(config)
        #: each layer's softmax scale and attention-logit cap, applied by the attention backend
        self.attention_scales = (float(config.query_pre_attn_scalar) ** -0.5,) * n
        cap = getattr(config, "attn_logit_softcapping", None)
        self.attention_softcaps = (None if cap is None else float(cap),) * n
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.embed_scale = config.hidden_size**0.5
        self.reset_rotary(torch.device("meta"))

    def rotary_of(self, layer_type: str) -> RotaryEmbedding:
        """The RoPE table of one layer type: Gemma 3's ``rope_parameters`` has one entry per
        type (local and global bases differ); Gemma 2's is one for all."""
        params = self.config.rope_parameters
        per_type = isinstance(params, dict) and layer_type in params
        return RotaryEmbedding(
            self.config,
            head_dim_of(self.config),
            self.max_positions,
            layer_type=layer_type if per_type else None,
        )

    def shared_rotary(self) -> RotaryEmbedding:
        """Placeholder the layers are built with; :meth:`reset_rotary` gives each its type's."""
        return self.rotary_of(layer_types(self.config)[0])

    def reset_rotary(self, device: torch.device) -> None:
        self.rotaries = {t: self.rotary_of(t).to(device) for t in sorted(set(self.layer_types))}
        for layer, t in zip(self.layers, self.layer_types):
            layer.self_attn.rotary = self.rotaries[t]

    def layers_forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        ropes = {t: rope_tables(r, batch, x.dtype) for t, r in self.rotaries.items()}
        for layer, t in zip(self.layers, self.layer_types):
            x = layer(x, batch, attn, ropes[t])
        logits = self.lm_head(self.norm(x[batch.logits_rows])).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
