"""Mixture-of-experts causal LMs: Mixtral, Qwen2-MoE and Qwen3-MoE over Plait's paged KV cache.

They are Llama models whose MLP is (in some layers) a :class:`~plait.models.moe.SparseMoeBlock`:
attention, norms, RoPE, embedding and head are :mod:`plait.models.llama`'s own modules, so
everything the engine does for Llama (radix cache, chunked prefill, overlap, structured
generation, every attention backend) holds unchanged. Per architecture:

- Mixtral: every layer sparse (``num_local_experts``, ``intermediate_size`` per expert),
  top-k weights always renormalised; Mistral's ``sliding_window``.
- Qwen2-MoE: layer ``i`` is sparse unless ``i in mlp_only_layers`` or
  ``(i + 1) % decoder_sparse_step``; sparse layers add a shared expert behind a sigmoid gate;
  dense layers are Llama's MLP of ``intermediate_size``; q/k/v bias (``qkv_bias``); Qwen2's
  sliding-window layers.
- Qwen3-MoE: Qwen2-MoE's layer rule without a shared expert, Qwen3's q/k RMSNorm attention.

Tensor parallelism is refused (``plait.models.moe_loader``): the experts are not sharded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from plait.core.tp.group import TPGroup
from plait.models.llama import DecoderLayer, LlamaForCausalLM, RotaryEmbedding
from plait.models.moe import FusedExperts, sparse_block_from_config
from plait.models.qwen3 import QKNormAttention
from plait.models.sliding_window import layer_windows

#: architecture -> the Llama-family model type whose sliding-window rule it follows
WINDOW_RULES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen2"}


def num_experts_of(config: Any) -> int:
    """Routed experts per sparse layer (Mixtral's ``num_local_experts``, Qwen's
    ``num_experts``)."""
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    return int(n or 0)


def is_sparse_layer(config: Any, layer_id: int) -> bool:
    """Whether layer ``layer_id`` is a MoE layer, by transformers' rule for the model type."""
    if config.model_type == "mixtral":
        return True
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only_mlp = getattr(config, "mlp_only_layers", None) or []
    return layer_id not in only_mlp and num_experts_of(config) > 0 and (layer_id + 1) % step == 0


def expert_intermediate_size(config: Any) -> int:
    """Each routed expert's intermediate size (Mixtral reuses ``intermediate_size``)."""
    if config.model_type == "mixtral":
        return int(config.intermediate_size)
    return int(config.moe_intermediate_size)


class _AsModelType:
    """``config`` seen with another ``model_type`` (to reuse that type's window rule)."""

    def __init__(self, config: Any, model_type: str):
        self._config, self.model_type = config, model_type

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def moe_layer_windows(config: Any, context_len: int) -> tuple[int | None, ...]:
    """Each layer's sliding window, by the rule of the dense model the architecture extends."""
    return layer_windows(_AsModelType(config, WINDOW_RULES[config.model_type]), context_len)


class MoeDecoderLayer(DecoderLayer):
    """Llama's layer with its ``mlp`` a :class:`SparseMoeBlock` where the config says so."""

    def __init__(
        self,
        config: Any,
        layer_id: int,
        rotary: RotaryEmbedding,
        tp: TPGroup,
        op: FusedExperts | None,
    ):
        super().__init__(config, layer_id, rotary, tp)
        if is_sparse_layer(config, layer_id):
            self.mlp = sparse_block_from_config(
                config,
                intermediate_size=expert_intermediate_size(config),
                num_experts=num_experts_of(config),
                op=op,
            )


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    """Qwen3's q/k-norm attention (:class:`~plait.models.qwen3.QKNormAttention`)."""

    attention_cls = QKNormAttention


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama model with :class:`MoeDecoderLayer` layers (Qwen3-MoE's with q/k norms);
    ``forward`` and ``layers_forward`` are Llama's. ``op``: the fused-experts op every sparse
    layer runs (None: torch's)."""

    def __init__(
        self,
        config: Any,
        max_positions: int,
        tp: TPGroup = TPGroup(),
        op: FusedExperts | None = None,
    ):
        if tp.size != 1:
            raise ValueError(
                f"tensor parallelism (tp_size={tp.size}) is not supported for "
                f"{config.architectures[0]}: its experts are not sharded"
            )
        # read by layer_cls during Llama's __init__, before nn.Module's own state exists
        object.__setattr__(self, "_op", op)
        super().__init__(config, max_positions, tp)
        self.sliding_windows = moe_layer_windows(config, max_positions)

    def layer_cls(  # type: ignore[override]
        self, config: Any, layer_id: int, rotary: RotaryEmbedding, tp: TPGroup
    ) -> nn.Module:
        """Llama's ``__init__`` builds each layer through this (in place of its class)."""
        return self.make_layer(config, layer_id, rotary, tp, self._op)

    def make_layer(
        self,
        config: Any,
        layer_id: int,
        rotary: RotaryEmbedding,
        tp: TPGroup,
        op: FusedExperts | None,
    ) -> nn.Module:
        """Layer ``layer_id``: Qwen3-MoE's attention normalises q and k per head."""
        if config.model_type == "qwen3_moe":
            return Qwen3MoeDecoderLayer(config, layer_id, rotary, tp, op)
        return MoeDecoderLayer(config, layer_id, rotary, tp, op)

    def sparse_blocks(self) -> list[tuple[int, nn.Module]]:
        """``(layer index, SparseMoeBlock)`` of every MoE layer."""
        return [
            (i, layer.mlp) for i, layer in enumerate(self.layers) if is_sparse_layer(self.config, i)
        ]


def check_moe_config(config: Any) -> None:
    """ValueError naming what this implementation cannot run (before anything is built)."""
    if config.model_type not in WINDOW_RULES:
        raise ValueError(f"model_type {config.model_type!r} is not a supported MoE architecture")
    if num_experts_of(config) < 1:
        raise ValueError(f"{config.architectures[0]}: the config has no experts")
