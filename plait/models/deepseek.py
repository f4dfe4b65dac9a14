"""DeepSeek-V2/V3 causal LM over Plait's paged latent KV pool (multi-head latent attention).

Each layer's attention projects the hidden state to a latent ``c`` (``kv_lora_rank`` values,
RMS-normed) and a RoPE key ``k_rope`` shared by every head; the pool stores ``[c | k_rope]``
per token (``plait.core.mla``). Attention runs in the absorbed form: the query's no-RoPE part
is multiplied by ``W_UK`` (the key half of ``kv_b_proj``) into latent space, attention reads
the stored rows directly, and its latent-space output is multiplied by ``W_UV`` (the value
half) before ``o_proj``. Per-head K/V are never materialised, in prefill or decode.

RoPE: DeepSeek rotates interleaved pairs ``(x0, x1), (x2, x3)...`` (V2 always; V3 when
``rope_interleave``, its default). The pairs are de-interleaved once into halves and rotated
with the Llama code's ``rotate_half`` (``plait.models.llama``): the same rotation of each pair,
the channels in another order, applied alike to queries and keys, so every dot product is
transformers'. YaRN's ``mscale_all_dim`` folds into the softmax scale as transformers does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from plait.core.forward_batch import ForwardBatch
from plait.models.deepseek_moe import DeepseekMoE, GatedMLP
from plait.models.llama import RMSNorm, RotaryEmbedding, apply_rotary, rope_parameters

if TYPE_CHECKING:
    from plait.core.mla import MLAAttentionBackend

ARCHITECTURES = {"DeepseekV2ForCausalLM": 2, "DeepseekV3ForCausalLM": 3}


def softmax_scale(config: Any) -> float:
    """``qk_head_dim ** -0.5``, times YaRN's ``mscale(factor, mscale_all_dim) ** 2``."""
    from transformers.modeling_rope_utils import yarn_apply_mscale

    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    return float(yarn_apply_mscale(rope_parameters(config), qk_head_dim**-0.5))


def rope_is_interleaved(config: Any, version: int) -> bool:
    return version == 2 or bool(getattr(config, "rope_interleave", True))


class MLAttention(nn.Module):
    """Multi-head latent attention, absorbed form (see the module docstring).

    ``w_uk`` [H, qk_nope_head_dim, kv_lora_rank] and ``w_uv`` [H, v_head_dim, kv_lora_rank]
    are ``kv_b_proj``'s two halves, kept as plain parameters (no backend repacks them)."""

    def __init__(self, config: Any, layer_id: int, interleaved: bool):
        super().__init__()
        self.layer_id = layer_id
        h, hidden = config.num_attention_heads, config.hidden_size
        self.num_heads = h
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.interleaved = interleaved
        self.scaling = softmax_scale(config)
        qk = self.nope_dim + self.rope_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.w_uk = nn.Parameter(
            torch.empty(h, self.nope_dim, self.kv_lora_rank), requires_grad=False
        )
        self.w_uv = nn.Parameter(torch.empty(h, self.v_dim, self.kv_lora_rank), requires_grad=False)
        self.o_proj = nn.Linear(h * self.v_dim, hidden, bias=bias)

    def _deinterleave(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1) if self.interleaved else x

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        attn: MLAAttentionBackend,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        t, h = x.shape[0], self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(t, h, -1).split((self.nope_dim, self.rope_dim), dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        c = self.kv_a_layernorm(c)
        q_rope, k_rope = apply_rotary(
            self._deinterleave(q_rope), self._deinterleave(k_rope).unsqueeze(1), *rope
        )
        # absorbed: [H, T, nope] @ [H, nope, R] -> each head's query in latent space
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)
        o = attn.forward(
            torch.cat((q_latent, q_rope), dim=-1),
            torch.cat((c, k_rope.squeeze(1)), dim=-1),
            self.layer_id,
            batch,
        )  # [T, H, R]
        o = torch.bmm(o.transpose(0, 1), self.w_uv.transpose(1, 2))  # [H, T, v_dim]
        return self.o_proj(o.transpose(0, 1).reshape(t, h * self.v_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, version: int):
        super().__init__()
        self.self_attn = MLAttention(config, layer_id, rope_is_interleaved(config, version))
        if layer_id >= config.first_k_dense_replace:
            self.mlp: nn.Module = DeepseekMoE(config, version)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        attn: MLAAttentionBackend,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, attn, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekForCausalLM(nn.Module):
    """``forward(batch, attn)`` returns float32 logits for ``batch.logits_rows``; ``attn`` is
    an :class:`~plait.core.mla.MLAAttentionBackend` over the latent pool."""

    def __init__(self, config: Any, max_positions: int, version: int):
        super().__init__()
        self.config = config
        self.version = version
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, version) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config, config.qk_rope_head_dim, max_positions)
        if self.rotary.threshold is not None:
            raise ValueError(
                f"rope_type {self.rotary.rope_type!r} is not supported for DeepSeek models "
                "(length-dependent frequencies; DeepSeek checkpoints use default or yarn)"
            )
        #: MLA has no sliding windows
        self.sliding_windows: tuple[int | None, ...] = (None,) * config.num_hidden_layers

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: MLAAttentionBackend) -> torch.Tensor:
        attn.init_forward_metadata(batch)
        x = self.embed_tokens(batch.input_ids)
        rope = self.rotary.tables(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, attn, rope)
        x = self.norm(x[batch.logits_rows])
        return self.lm_head(x).float()
