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
    """cos/sin tables for every position up to the context length, computed like transformers.

    ``dynamic`` (NTK) and ``longrope`` follow transformers' rule: a forward whose sequence
    reaches length L past ``threshold`` (``max_position_embeddings``; longrope's
    ``original_max_position_embeddings``) rotates all its new tokens with the frequencies for
    L (NTK's stretch for L, longrope's long factors; keys already cached keep theirs).
    :meth:`tables` applies it per request given each token's ``lengths``, so a decode step at
    length L equals transformers' forward for every such type; a prompt equals transformers'
    when it is within ``threshold`` (any chunking or cache hit) or when it is prefilled in one
    piece (transformers itself differs between chunkings there). Phi-3's ``generate`` adds
    one step for ``longrope``: when a sequence first grows past ``threshold`` it drops its
    cache and recomputes every token with the long factors; the scheduler does the same
    (``LlamaForCausalLM.rope_reprefill_length``: the request is prefilled again, equal to
    ``generate`` when that prefill is one piece).
    """

    def __init__(
        self, config: Any, head_dim: int, max_positions: int, layer_type: str | None = None
    ):
        super().__init__()
        params = rope_parameters(config)
        if layer_type is not None:  # per-layer-type settings (Gemma 3's local and global)
            params = dict(params[layer_type])
        rope_type = params.get("rope_type", "default")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"partial_rotary_factor={params['partial_rotary_factor']} is not supported "
                "(Plait rotates the whole head)"
            )
        self.rope_type, self.config = rope_type, config
        self.init_kwargs = {} if layer_type is None else {"layer_type": layer_type}
        #: the sequence length past which frequencies change (None: they never do)
        self.threshold: int | None = None
        if rope_type == "dynamic":
            self.threshold = int(config.max_position_embeddings)
        if rope_type == "longrope":  # short factors up to this length, long ones past it
            self.threshold = int(
                params.get("original_max_position_embeddings")
                or config.original_max_position_embeddings
            )
        if rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = self._init_freq(None)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def _init_freq(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        """transformers' own ``inv_freq`` and attention scaling for this type (at ``seq_len``)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kwargs = dict(self.init_kwargs)
        if seq_len is not None:
            kwargs["seq_len"] = seq_len
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, None, **kwargs)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype, lengths: list[int] | None = None):
        """cos/sin rows for these positions, [T, 1, D]: looked up once per forward. ``lengths``
        (length-dependent types): token i's request's sequence length after this forward."""
        cos, sin = self.cos[positions], self.sin[positions]
        if self.threshold is not None and lengths is not None:
            cos, sin = self._stretched(positions, lengths, cos, sin)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def _stretched(
        self, positions: torch.Tensor, lengths: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of tokens whose forward reaches past ``threshold``, recomputed with the
        frequencies of their length (one set per distinct length in the batch)."""
        assert self.threshold is not None
        long = sorted({n for n in lengths if n > self.threshold})
        if not long:
            return cos, sin
        cos, sin = cos.clone(), sin.clone()
        per_token = torch.tensor(lengths, device=positions.device)
        for n in long:
            rows = per_token == n
            inv_freq, scaling = self._init_freq(n)
            freqs = positions[rows].float()[:, None] * inv_freq.float().to(positions.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos[rows], sin[rows] = emb.cos() * scaling, emb.sin() * scaling
        return cos, sin


def forward_lengths(batch: ForwardBatch) -> list[int]:
    """Each token's request's sequence length after this forward (what a length-dependent
    RoPE, ``RotaryEmbedding.threshold``, scales by)."""
    if batch.is_decode:
        return list(batch.seq_lens_cpu)
    out: list[int] = []
    for n, ext in zip(batch.seq_lens_cpu, batch.extend_lens_cpu):
        out += [n] * ext
    return out


def rope_tables(
    rotary: RotaryEmbedding, batch: ForwardBatch, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary``'s cos/sin for the batch's tokens (their lengths only where they matter)."""
    lengths = forward_lengths(batch) if rotary.threshold is not None else None
    return rotary.tables(batch.positions, dtype, lengths)


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
    #: the attention module each layer builds: a variant (Qwen3's q/k norms) overrides it
    attention_cls: type[Attention] = Attention

    def __init__(self, config: Any, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup):
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, rotary, tp)
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

    #: the decoder layer class: an architecture that differs only inside a layer overrides it
    layer_cls: type[nn.Module] = DecoderLayer
    #: a pipeline stage (``plait.models.pp_stage``) once cut to one; None: the whole model
    pp_stage: Any = None

    def __init__(self, config: Any, max_positions: int, tp: TPGroup = TPGroup()):
        super().__init__()
        self.config = config
        self.tp = tp
        self.max_positions = max_positions
        self.vocab_size = config.vocab_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        rotary = self.shared_rotary()
        #: past this sequence length a forward rotates with other frequencies (None: never);
        #: the engine keeps such prompts' prefix cache apart (``RequestIntake``)
        self.rope_regime_length = rotary.threshold
        #: longrope: a sequence crossing the switch is prefilled again whole (the scheduler's
        #: ``rope_reprefill_length``), as Phi-3's ``generate`` recomputes its cache there
        self.rope_reprefill_length = rotary.threshold if rotary.rope_type == "longrope" else None
        self.layers = nn.ModuleList(
            self.layer_cls(config, i, rotary, tp) for i in range(config.num_hidden_layers)
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

    def shared_rotary(self) -> RotaryEmbedding:
        """The RoPE table the layers are built with (every layer shares it)."""
        return RotaryEmbedding(self.config, head_dim_of(self.config), self.max_positions)

    def reset_rotary(self, device: torch.device) -> None:
        """Rebuild the RoPE tables on ``device`` (a model built on the meta device and moved
        with ``to_empty`` has them uninitialised); every layer shares one table."""
        rotary = self.shared_rotary().to(device)
        for layer in self.layers:
            layer.self_attn.rotary = rotary

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        # Metadata built from host lists stays outside any compiled region: what follows reads
        # tensors only, so a compiled decode never guards on (and recompiles for) lengths.
        attn.init_forward_metadata(batch)
        step = self.decode_forward if batch.is_decode else self.extend_forward
        # adapter batches need the LoRA wrappers of the eager layers, unless the backend's
        # step carries the adapters itself (the CPU native step, plait/backends/cpu/native_lora);
        # a pipeline stage's cut runs the eager layers too
        carries = batch.lora_ids is None or getattr(step, "carries_lora", False)
        if step is not None and carries and self.pp_stage is None:
            return step(batch, attn)
        return self.layers_forward(batch, attn)

    def layers_forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Embedding, layers and lm_head, after ``attn.init_forward_metadata(batch)``. A
        pipeline stage without the embedding starts from ``batch.pp_hidden``; one without the
        LM head returns its hidden states ``[T, H]`` for the next stage."""
        x = self.embed_tokens(batch.input_ids) if self.embed_tokens is not None else batch.pp_hidden
        assert x is not None, "a later pipeline stage runs on the previous stage's hidden states"
        rope = rope_tables(self.layers[0].self_attn.rotary, batch, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, attn, rope)
        if self.lm_head is None:
            return x
        x = self.norm(x[batch.logits_rows])
        return self.lm_head(x).float()


def qkv_bias(config: Any) -> bool:
    # Qwen2 always has q/k/v bias; its config does not say so. Qwen2-MoE's says `qkv_bias`.
    return (
        bool(getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False))
        or config.model_type == "qwen2"
    )
