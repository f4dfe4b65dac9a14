"""Load a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint into :class:`MoeForCausalLM`.

Checkpoints store each expert's projections separately (Mixtral's
``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen's ``mlp.experts.{e}.gate_proj/up_proj/down_proj``);
they are copied straight into slices of the stacked ``w_gate_up[E, 2I, H]`` / ``w_down[E, H, I]``
(gate rows first, then up), q/k/v into the fused ``qkv_proj`` and gate/up into ``gate_up_proj``.
Every parameter starts as NaN, so one that no checkpoint tensor covered is named, not served.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from plait.models.checkpoint_files import checkpoint_entries
from plait.models.moe_models import MoeForCausalLM, check_moe_config

if TYPE_CHECKING:
    from plait.core.backend_api import ModelSpec
    from plait.quant.modules import QuantizedMatmul

_EXPERT = re.compile(
    r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
# a projection -> (fused parameter, which piece of it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def load_moe(
    spec: "ModelSpec",
    device: torch.device,
    matmul: "QuantizedMatmul | None",
    model_cls: type[MoeForCausalLM] = MoeForCausalLM,
) -> MoeForCausalLM:
    """The model for ``spec`` with its weights, its sparse layers running ``spec.fused_moe``
    (the backend's op). Refuses, naming the reason, tensor parallelism. A GGUF file's
    weights are read from the file (:mod:`plait.models.moe_gguf`)."""
    config, quant = spec.hf_config, spec.quantization
    check_moe_config(config)
    if quant.method != "none" and device.type != "cpu" and spec.graph_capture:
        raise ValueError(
            f"quantization={quant.method!r} experts of {config.architectures[0]} run grouped "
            "in torch, which reads the expert counts on the host and cannot be captured: "
            "pass --disable-graph-capture"
        )
    if quant.method != "none" and matmul is None:
        raise ValueError(f"quantization={quant.method!r} needs the backend's quantized matmul")
    op = getattr(spec, "fused_moe", None)
    with torch.device("meta"):
        model = model_cls(config, spec.context_len, spec.tp, op)
    model = model.to_empty(device=device)
    model.reset_rotary(device)
    gguf_file = _gguf_weights(spec)
    if gguf_file is None:
        load_moe_weights(model, spec.model_dir)
        model = model.to(spec.dtype).eval()
    else:  # the file's own blocks (gguf), or all of it dequantized (none)
        from plait.models.moe_gguf import load_moe_gguf

        model = model.to(spec.dtype).eval()
        dequantize = quant.method != "gguf"
        load_moe_gguf(model, gguf_file, config, spec.dtype, matmul, dequantize)
    if quant.method in ("int8", "int4"):
        from plait.models.moe_quant import quantize_moe_model

        assert matmul is not None
        quantize_moe_model(model, quant.method, matmul, quant.group_size, quant.symmetric)
    if device.type == "cpu":
        from plait.models.loader import _store_linear_weights_column_major

        _store_linear_weights_column_major(model)
    return model


def _gguf_weights(spec: "ModelSpec") -> Path | None:
    """The GGUF file to read the weights from: ``quantization='gguf'``'s, or (dequantized,
    then int8/int4 as asked) the file a directory was converted from when it holds no
    safetensors (a MoE GGUF's conversion writes none: :mod:`plait.models.moe_gguf`)."""
    from plait.models.loader import gguf_source

    if spec.quantization.method == "gguf":
        if spec.quantization.gguf_file is None:
            raise ValueError("quantization='gguf' needs the .gguf file its blocks are read from")
        return spec.quantization.gguf_file
    if not any(Path(spec.model_dir).glob("*.safetensors")):
        return gguf_source(spec.model_dir)
    return None


def load_moe_weights(model: MoeForCausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into its (slice of a) parameter; ValueError naming the
    parameters no tensor filled, or a tensor with no parameter."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))
    for name, f in checkpoint_entries(model_dir):
        target = _target(name, model)
        if target is None:
            continue
        param, index = target
        if param not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        with torch.no_grad():
            params[param][index].copy_(f.get_tensor(name))
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight
    missing = sorted(n for n, p in model.named_parameters() if torch.isnan(p).any())
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights: {missing[:5]}")


def _target(name: str, model: MoeForCausalLM) -> tuple[str, Any] | None:
    """The parameter a checkpoint tensor fills and the index of its slice there (None: a
    tensor the model does not use)."""
    name = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
    if "rotary_emb" in name:
        return None
    m = _EXPERT.match(name)
    if m:
        layer, expert, proj = int(m[1]), int(m[2]), m[3]
        experts = model.layers[layer].mlp.experts
        inter = experts.intermediate_size
        if proj in ("w2", "down_proj"):
            return f"layers.{layer}.mlp.experts.w_down", (expert,)
        rows = slice(0, inter) if proj in ("w1", "gate_proj") else slice(inter, 2 * inter)
        return f"layers.{layer}.mlp.experts.w_gate_up", (expert, rows)
    for hf, (ours, piece) in _FUSED.items():
        head, sep, tail = name.partition(f".{hf}.")
        if sep:
            module = model.get_submodule(f"{head}.{ours.rpartition('.')[0]}".rstrip("."))
            sizes = _piece_sizes(module, ours)
            start = sum(sizes[:piece])
            return f"{head}.{ours}.{tail}", (slice(start, start + sizes[piece]),)
    return name, (slice(None),)


def _piece_sizes(module: Any, fused: str) -> tuple[int, ...]:
    """Row counts of the pieces of a fused parameter: q/k/v of an attention module, or gate
    and up of an MLP (Llama's or a shared expert)."""
    if fused.startswith("self_attn"):
        return tuple(module.split)
    return (module.inter, module.inter)
