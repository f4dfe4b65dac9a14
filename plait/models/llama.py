"""Llama-family causal LM (Llama, SmolLM2, Mistral, Qwen2) running over Plait's paged KV cache.

The math mirrors transformers' reference modules op for op (fp32 RMSNorm, RoPE computed as
``position * inv_freq`` then cos/sin) so greedy outputs match it token for token in float32.
q/k/v and gate/up projections are fused into one matmul each: fewer ops per layer is what
decides CPU decode speed at batch 1.

Every module takes a :class:`~plait.core.tp.group.TPGroup`; with ``tp.size > 1`` it holds only
its rank's shard (Megatron-style, see ``plait/models/parallel_layers.py`` and
``plait/core/tp/sharding.py``): local query/KV heads, local intermediate columns, local
vocabulary rows. ``forward`` still returns the full logits on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from plait.core.forward_batch import ForwardBatch
from plait.core.model_runner import head_dim_of
from plait.core.tp.group import TPGroup
from plait.core.tp.sharding import HeadShard, shard_heads, split_range
from plait.models.parallel_layers import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from plait.models.sliding_window import layer_windows

if TYPE_CHECKING:
    from plait.core.backend_api import AttentionBackend


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_parameters(config: Any) -> dict:
    """The config's RoPE settings in transformers>=5 form (``rope_parameters``), accepting the
    older ``rope_theta`` + ``rope_scaling`` attributes too."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the context length, computed like transformers."""

    def __init__(self, config: Any, head_dim: int, max_positions: int):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        elif rope_type == "dynamic":
            raise ValueError(
                "rope_type 'dynamic' is not supported (its frequencies depend on "
                "the sequence length, which a shared prefix cache cannot honour)"
            )
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin rows for these positions, [T, 1, D]: looked up once per forward."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    qk = torch.cat((q, k), dim=1)  # rotate q and k heads together: half the ops
    qk = qk * cos + _rotate_half(qk) * sin
    return qk.split((q.shape[1], k.shape[1]), dim=1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """This rank's heads (``shard``): qkv is column-parallel, o_proj row-parallel."""

    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup):
        super().__init__()
        self.layer_id = layer_id
        self.shard: HeadShard = shard_heads(
            config.num_attention_heads, config.num_key_value_heads, tp.size, tp.rank
        )
        self.num_heads = self.shard.num_heads
        self.num_kv_heads = self.shard.num_kv_heads
        self.head_dim = head_dim_of(config)
        bias = qkv_bias(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=bias)
        self.o_proj = RowParallelLinear(
            q_size, config.hidden_size, getattr(config, "attention_out_bias", False), tp
        )
        self.rotary = rotary

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
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rope)
        o = attn.forward(q, k, v, self.layer_id, batch)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    """Intermediate columns ``inter_range`` of the full MLP: gate/up column-parallel, down
    row-parallel."""

    def __init__(self, config: Any, tp: TPGroup):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.inter_range = split_range(config.intermediate_size, tp.size, tp.rank)
        self.inter = self.inter_range[1] - self.inter_range[0]
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.inter, bias=bias)
        self.down_proj = RowParallelLinear(self.inter, config.hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup):
        super().__init__()
        self.self_attn = Attention(config, layer_id, rotary, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        attn: AttentionBackend,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, attn, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """``forward`` returns logits for ``batch.logits_rows`` only: prefill needs one row per
    request (or the prompt rows asked for logprobs), never a [T, vocab] matrix by default."""

    def __init__(self, config: Any, max_positions: int, tp: TPGroup = TPGroup()):
        super().__init__()
        self.config = config
        self.tp = tp
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        rotary = RotaryEmbedding(config, head_dim_of(config), max_positions)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary, tp) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp)
        #: layer i's sliding window for contexts up to ``max_positions`` (None: full
        #: attention); the attention backend applies it (``AttentionBackend.sliding_windows``)
        self.sliding_windows = layer_windows(config, max_positions)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight
        #: runs decode steps instead of :meth:`layers_forward` when set (a backend's compiled
        #: version of it, e.g. the CPU backend's ``torch.compile`` or native C++ step)
        self.decode_forward: Any = None
        #: runs extend (prefill) batches instead of :meth:`layers_forward` when set (the CPU
        #: backend's native step); same contract as ``decode_forward``
        self.extend_forward: Any = None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        # Metadata built from host lists stays outside any compiled region: what follows reads
        # tensors only, so a compiled decode never guards on (and recompiles for) lengths.
        attn.init_forward_metadata(batch)
        if batch.is_decode and self.decode_forward is not None:
            return self.decode_forward(batch, attn)
        if not batch.is_decode and self.extend_forward is not None:
            return self.extend_forward(batch, attn)
        return self.layers_forward(batch, attn)

    def layers_forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Embedding, layers and lm_head, after ``attn.init_forward_metadata(batch)``."""
        x = self.embed_tokens(batch.input_ids)
        rope = self.layers[0].self_attn.rotary.tables(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, attn, rope)
        x = self.norm(x[batch.logits_rows])
        return self.lm_head(x).float()


def qkv_bias(config: Any) -> bool:
    # Qwen2 always has q/k/v bias; its config does not say so. Qwen2-MoE's says `qkv_bias`.
    return (
        bool(getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False))
        or config.model_type == "qwen2"
    )
