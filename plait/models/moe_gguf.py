"""Mixture-of-experts GGUF files: Mixtral (llama.cpp files it as ``llama`` with
``llama.expert_count``), Qwen2-MoE (``qwen2moe``) and Qwen3-MoE (``qwen3moe``).

transformers cannot describe them from the metadata (it reads a Mixtral file as a dense Llama;
its ``qwen2_moe`` reading leaves the expert sizes at their defaults), so Plait converts them
itself: :func:`convert_moe_gguf` writes the config (from the metadata and the tensors present)
and the tokenizer (transformers' reading of ``tokenizer.ggml.*``), and no weights: the weights
are always read from the GGUF file by :func:`load_moe_gguf` through
:func:`plait.quant.gguf.load_gguf_weights`, dequantized to float (``quantization='none'``) or
with Q4_0 / Q4_1 / Q8_0 blocks kept (``'gguf'``), experts included
(:class:`~plait.models.moe_quant.QuantizedMoEExperts`: one quantized Linear per expert, run
grouped by expert through the backend's quantized matmul).

Routing follows llama.cpp's graph for each architecture: Mixtral and Qwen3-MoE renormalise the
top-k weights, Qwen2-MoE does not (``{arch}.expert_weights_norm`` overrides when written).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: GGUF architecture -> (transformers model_type, architecture class, renormalised top-k)
_ARCHS = {
    "llama": ("mixtral", "MixtralForCausalLM", True),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM", False),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM", True),
}


def _value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def is_moe_gguf(reader: Any) -> bool:
    """Whether the parsed file is a mixture-of-experts model this module converts."""
    arch = _value(reader, "general.architecture")
    return arch in _ARCHS and int(_value(reader, f"{arch}.expert_count", 0) or 0) > 0


def moe_config(reader: Any) -> dict:
    """The transformers config (as a dict) the file's metadata and tensors describe."""
    from transformers import AutoConfig

    arch = _value(reader, "general.architecture")
    model_type, cls, renorm = _ARCHS[arch]
    get = lambda key, default=None: _value(reader, f"{arch}.{key}", default)  # noqa: E731
    names = {t.name for t in reader.tensors}
    layers = int(get("block_count"))
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    vocab = get("vocab_size") or len(_value(reader, "tokenizer.ggml.tokens"))
    fields: dict[str, Any] = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        num_experts_per_tok=int(get("expert_used_count")),
        norm_topk_prob=bool(get("expert_weights_norm", renorm)),
        intermediate_size=int(get("feed_forward_length")),
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_value(reader, "tokenizer.ggml.eos_token_id"),
        architectures=[cls],
    )
    experts = int(get("expert_count"))
    if model_type == "mixtral":
        fields.update(num_local_experts=experts, sliding_window=None)
        fields["intermediate_size"] = int(
            get("expert_feed_forward_length") or get("feed_forward_length")
        )
    else:
        fields.update(
            num_experts=experts,
            moe_intermediate_size=int(get("expert_feed_forward_length")),
            decoder_sparse_step=1,
            # a layer with no router is dense (llama.cpp's own files have none)
            mlp_only_layers=[
                i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names
            ],
            use_sliding_window=False,
        )
    if model_type == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length", 0))
        fields["qkv_bias"] = "blk.0.attn_q.bias" in names
    return AutoConfig.for_model(model_type, **fields).to_dict()


def convert_moe_gguf(reader: Any, gguf_file: Path, out: Path) -> None:
    """Write ``out/config.json`` and the tokenizer for a MoE GGUF file (no weights: the
    loader reads them from the file, whose path the caller records)."""
    from transformers import AutoTokenizer

    (out / "config.json").write_text(json.dumps(moe_config(reader), indent=2))
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.save_pretrained(out)


def load_moe_gguf(
    model: nn.Module,
    gguf_file: Path,
    config: Any,
    dtype: torch.dtype,
    matmul: Any,
    dequantize: bool,
) -> None:
    """Fill a :class:`~plait.models.moe_models.MoeForCausalLM` from ``gguf_file``: float32
    everywhere (``dequantize``), or the file's blocks kept, experts included."""
    from plait.models.moe_quant import QuantizedMoEExperts
    from plait.quant.gguf import load_gguf_weights
    from plait.quant.modules import QuantizedLinear

    def experts(gate_up: list, down: list, module: nn.Module) -> nn.Module:
        return QuantizedMoEExperts(
            [QuantizedLinear(w, None, matmul) for w in gate_up],
            [QuantizedLinear(w, None, matmul) for w in down],
            module.activation,
        )

    load_gguf_weights(
        model, gguf_file, config, dtype, matmul, dequantize=dequantize, experts=experts
    )
