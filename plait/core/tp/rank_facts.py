"""What one tensor-parallel rank actually holds, read off its built model: ``get_server_info``
reports it per rank (``tp_ranks``), so a rank that loaded the whole model instead of its shard,
or captured decode against the flags, shows.

The sizes come from the layers' real shapes (the first decoder layer's; every layer has the
same shard), not from the shard plan, so they report what was built. Ranks 1..N-1 compute
theirs in their worker process and send them to rank 0 with their ready signal
(``plait.core.tp.worker``); a rank's facts never change after it is built.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class RankFacts:
    """One rank's shard: its query (``attention_heads``) and KV heads, MLP intermediate rows
    (``mlp_rows``), embedding/LM-head vocabulary rows (``vocab_rows``), the bytes its weights
    occupy (``weight_bytes``: :func:`plait.quant.modules.weight_bytes`, each storage once)
    and whether its decode is captured (``decode_captured``: a graph runner exists)."""

    rank: int
    attention_heads: int
    kv_heads: int
    mlp_rows: int
    vocab_rows: int
    weight_bytes: int
    decode_captured: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "RankFacts":
        return cls(**json.loads(text))


def has_facts(model: Any) -> bool:
    """Whether :func:`facts_of` can read ``model``: Plait's Llama layout (its ``tp``, decoder
    ``layers`` and ``embed_tokens``; a plugin's subclass has it too). The core cannot ask
    ``isinstance`` of a class in ``plait.models``, which it never imports."""
    return all(hasattr(model, name) for name in ("tp", "layers", "embed_tokens"))


def facts_of(runner: Any) -> RankFacts:
    """The facts of ``runner`` (a :class:`~plait.core.model_runner.ModelRunner` over Plait's
    Llama model, whose ``tp`` says which rank it is)."""
    from plait.quant.modules import weight_bytes

    model = runner.model
    layer = model.layers[0]
    head_dim = layer.self_attn.head_dim
    q_rows = layer.self_attn.o_proj.in_features  # o_proj's input columns are the local heads
    kv_rows = (layer.self_attn.qkv_proj.out_features - q_rows) // 2
    return RankFacts(
        rank=model.tp.rank,
        attention_heads=q_rows // head_dim,
        kv_heads=kv_rows // head_dim,
        mlp_rows=_mlp_rows(layer.mlp),
        vocab_rows=_rows_held(model.embed_tokens),
        weight_bytes=weight_bytes(model),
        decode_captured=runner.graph_runner is not None,
    )


def _mlp_rows(mlp: Any) -> int:
    """The first layer's MLP intermediate rows: a dense MLP's ``down_proj`` input columns, a
    mixture-of-experts layer's per-expert ``experts.intermediate_size``."""
    down = getattr(mlp, "down_proj", None)
    if down is not None:
        return int(down.in_features)
    return int(mlp.experts.intermediate_size)


def _rows_held(embedding: Any) -> int:
    """The vocabulary rows an embedding holds on this rank: its weight's rows, or, for a
    quantized embedding (no float weight), what it reports as ``num_embeddings``."""
    weight = getattr(embedding, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(embedding.num_embeddings)
