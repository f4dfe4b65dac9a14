"""Load a GGUF file's tensors straight into Plait's Llama model, keeping Q4_0 / Q4_1 / Q8_0
blocks quantized (:mod:`plait.quant.formats` uses GGUF's own block layout, so codes are copied
and float16 scales/mins are kept as they are: nothing is rounded).

Same conventions as transformers' GGUF loader, which the dequantized ``none`` path uses:
llama.cpp stores the q/k rows of ``llama`` models permuted for its RoPE, so those rows are
permuted back (a row permutation: blocks stay intact); q/k/v and gate/up are fused row-wise
like :mod:`plait.models.loader` does for safetensors. Phi-3 files hold them fused already
(``attn_qkv``, and ``ffn_up`` is gate then up).

Mixture-of-experts files (Mixtral, which llama.cpp files as ``llama``; ``qwen2moe``,
``qwen3moe``) stack each layer's experts in 3-D tensors ``ffn_{gate,up,down}_exps``
``[E, rows, cols]``: read as one piece per expert (:func:`read_pieces`), which
:mod:`plait.models.moe_gguf` places. Routers (``ffn_gate_inp``, ``ffn_gate_inp_shexp``) are
always read as float: they are tiny and decide routing (llama.cpp keeps them F32 too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from plait.quant.formats import QuantizedWeight
from plait.quant.modules import QuantizedEmbedding, QuantizedLinear, QuantizedMatmul

# GGUF block type -> (bytes per 32 weights, bits, has mins)
_BLOCKS = {"Q4_0": (18, 4, False), "Q4_1": (20, 4, True), "Q8_0": (34, 8, False)}
_FLOATS = ("F32", "F16", "BF16")
# GGUF per-layer tensor -> (Plait module under layers.N, shard index among fused pieces)
_LAYER = {
    "attn_q": ("self_attn.qkv_proj", 0),
    "attn_k": ("self_attn.qkv_proj", 1),
    "attn_v": ("self_attn.qkv_proj", 2),
    "attn_output": ("self_attn.o_proj", 0),
    "ffn_gate": ("mlp.gate_up_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": ("mlp.down_proj", 0),
    "attn_norm": ("input_layernorm", 0),
    "ffn_norm": ("post_attention_layernorm", 0),
}
_QK_NORM = {"attn_q_norm": ("self_attn.q_norm", 0), "attn_k_norm": ("self_attn.k_norm", 0)}
# Gemma's four norms per layer: llama.cpp's ``ffn_norm`` is the one before the MLP there
_GEMMA = {
    **_LAYER,
    **_QK_NORM,
    "post_attention_norm": ("post_attention_layernorm", 0),
    "ffn_norm": ("pre_feedforward_layernorm", 0),
    "post_ffw_norm": ("post_feedforward_layernorm", 0),
}
# Mixture of experts: stacked experts, the router, Qwen2-MoE's shared expert and its gate
_MOE = {
    "ffn_gate_exps": ("mlp.experts.w_gate_up", 0),
    "ffn_up_exps": ("mlp.experts.w_gate_up", 1),
    "ffn_down_exps": ("mlp.experts.w_down", 0),
    "ffn_gate_inp": ("mlp.gate", 0),
    "ffn_gate_shexp": ("mlp.shared_expert.gate_up_proj", 0),
    "ffn_up_shexp": ("mlp.shared_expert.gate_up_proj", 1),
    "ffn_down_shexp": ("mlp.shared_expert.down_proj", 0),
    "ffn_gate_inp_shexp": ("mlp.shared_expert_gate", 0),
}
_ROUTERS = ("ffn_gate_inp", "ffn_gate_inp_shexp")
# Phi-3 stores q/k/v fused (``attn_qkv``) and gate/up fused in ``ffn_up``
_PHI3 = {
    "attn_qkv": ("self_attn.qkv_proj", 0),
    "attn_output": ("self_attn.o_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 0),
    "ffn_down": ("mlp.down_proj", 0),
    "attn_norm": ("input_layernorm", 0),
    "ffn_norm": ("post_attention_layernorm", 0),
}
#: ``general.architecture`` -> its per-layer names (llama.cpp's, as gguf-py's name map spells
#: them). Mixtral files say ``llama`` and hold ``ffn_*_exps`` expert tensors.
LAYER_NAMES = {
    "llama": {**_LAYER, **_MOE},
    "qwen2": _LAYER,
    "qwen3": {**_LAYER, **_QK_NORM},
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "phi3": _PHI3,
    "qwen2moe": {**_LAYER, **_MOE},
    "qwen3moe": {**_LAYER, **_QK_NORM, **_MOE},
}
_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}

Piece = QuantizedWeight | torch.Tensor
#: a stacked expert tensor read for ``quantization='gguf'``: one quantized piece per expert
ExpertPieces = list[QuantizedWeight]


def block_weight(type_name: str, data: np.ndarray, rows: int) -> QuantizedWeight:
    """A GGUF quantized tensor's raw bytes ``[rows, n_blocks * block_bytes]`` as a
    :class:`QuantizedWeight` (group = block = 32)."""
    size, bits, has_mins = _BLOCKS[type_name]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8)).view(rows, -1, size)
    half = lambda a, b: raw[..., a:b].contiguous().view(torch.float16).reshape(rows, -1)  # noqa
    scales = half(0, 2)
    mins = half(2, 4) if has_mins else None
    qs = raw[..., (4 if has_mins else 2) :].contiguous().reshape(rows, -1)
    if bits == 8:
        qs = qs.view(torch.int8)
    return QuantizedWeight(bits, 32, qs, scales, mins)


def _dequantized(tensor: Any) -> torch.Tensor:
    """Any GGUF tensor (K-quants too) as float32 in its logical shape (gguf-py's decoder)."""
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type))).float()


def _read(tensor: Any, dequantize: bool = False) -> Piece | ExpertPieces:
    """The tensor as float (``dequantize``, a float type, or a router) or as blocks; a 3-D
    stacked expert tensor in blocks is one :class:`QuantizedWeight` per expert."""
    kind = tensor.tensor_type.name
    router = tensor.name.split(".")[2] in _ROUTERS if tensor.name.startswith("blk.") else False
    if kind in _FLOATS:
        return torch.from_numpy(np.array(tensor.data)).float()
    if dequantize or router:
        return _dequantized(tensor)
    if kind in _BLOCKS and len(tensor.shape) == 3:
        experts, rows = int(tensor.shape[2]), int(tensor.shape[1])
        data = np.asarray(tensor.data).reshape(experts * rows, -1)
        stacked = block_weight(kind, data, experts * rows)
        return [stacked.rows(torch.arange(e * rows, (e + 1) * rows)) for e in range(experts)]
    if kind in _BLOCKS:
        rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
        return block_weight(kind, tensor.data, rows)
    raise ValueError(
        f"GGUF tensor {tensor.name!r} has type {kind}, which quantization='gguf' "
        f"does not run natively (it runs {', '.join(_BLOCKS)} and float tensors); "
        "use quantization='none' to run the file dequantized"
    )


def _unpermute(piece: Piece, heads: int) -> Piece:
    """Undo llama.cpp's q/k row permutation (transformers' ``_reverse_permute_weights``)."""
    n = piece.shape[0]
    index = torch.arange(n).view(heads, n // heads // 2, 2).transpose(1, 2).reshape(n)
    return piece.rows(index) if isinstance(piece, QuantizedWeight) else piece[index]


def _cat(pieces: list, what: str) -> Piece | ExpertPieces:
    """Fused pieces one after the other along the rows (per expert for stacked experts)."""
    if all(isinstance(p, list) for p in pieces):
        return [_cat([p[e] for p in pieces], what) for e in range(len(pieces[0]))]  # type: ignore[misc]
    if all(isinstance(p, torch.Tensor) for p in pieces):
        return torch.cat(pieces, dim=0 if pieces[0].dim() == 1 else -2)
    first = pieces[0]
    same = all(
        isinstance(p, QuantizedWeight)
        and p.bits == first.bits
        and p.group_size == first.group_size
        and (p.mins is None) == (first.mins is None)
        for p in pieces
    )
    if not same:
        raise ValueError(
            f"{what}: fused GGUF tensors mix block types (or float and blocks); "
            "use quantization='none'"
        )
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return QuantizedWeight(
        first.bits,
        first.group_size,
        cat([p.qs for p in pieces]),
        cat([p.scales for p in pieces]),
        cat([p.mins for p in pieces]),
    )


def _field(reader: Any, key: str) -> str:
    f = reader.fields[key]
    return bytes(f.parts[f.data[0]]).decode()


def layer_names_of(arch: str) -> dict[str, tuple[str, int]]:
    """The per-layer name map of ``arch``; a ValueError naming the architecture for one
    Plait does not read natively."""
    if arch not in LAYER_NAMES:
        raise ValueError(
            f"quantization='gguf' does not read GGUF architecture {arch!r} (it reads "
            f"{', '.join(LAYER_NAMES)}); use quantization='none' to run the file dequantized"
        )
    return LAYER_NAMES[arch]


def read_pieces(
    gguf_file: Path, config: Any, dequantize: bool = False
) -> dict[tuple[str, str], Any]:
    """``{(plait module path, "weight"|"bias"): tensor, QuantizedWeight or one per expert}``,
    fused and un-permuted, straight from the file (all float32 when ``dequantize``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    arch = _field(reader, "general.architecture")
    layer_names = layer_names_of(arch)
    permute = arch == "llama"
    # llama.cpp stores Gemma's RMSNorm weights as 1 + w; Plait's GemmaRMSNorm holds w
    norm_offset = 1.0 if arch.startswith("gemma") else 0.0
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    shards: dict[tuple[str, str], dict[int, Piece]] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] == "blk" and parts[2] in layer_names:
            path, shard = layer_names[parts[2]]
            path = f"layers.{parts[1]}.{path}"
        elif parts[0] in _TOP and len(parts) == 2:
            path, shard = _TOP[parts[0]], 0
        else:
            continue  # e.g. rope_freqs: Plait computes its own tables
        piece = _read(tensor, dequantize)
        if permute and parts[0] == "blk" and parts[2] in heads:
            piece = _unpermute(piece, heads[parts[2]])
        if norm_offset and path.endswith("norm") and isinstance(piece, torch.Tensor):
            piece = piece - norm_offset
        shards.setdefault((path, parts[-1]), {})[shard] = piece
    return {key: _cat([s[i] for i in sorted(s)], key[0]) for key, s in shards.items()}


#: builds a layer's quantized experts from one ``gate_up`` and one ``down`` block weight per
#: expert and the float module they replace (``plait.models.moe_gguf``)
ExpertsFactory = Callable[[ExpertPieces, ExpertPieces, nn.Module], nn.Module]


def load_gguf_weights(
    model: nn.Module,
    gguf_file: Path,
    config: Any,
    dtype: torch.dtype,
    matmul: QuantizedMatmul | None,
    *,
    dequantize: bool = False,
    experts: ExpertsFactory | None = None,
) -> None:
    """Fill ``model`` (already on its device, in ``dtype``) from ``gguf_file``: quantized
    tensors become :class:`QuantizedLinear` / :class:`QuantizedEmbedding` (``experts`` builds
    a layer's quantized experts), float tensors (every tensor when ``dequantize``) are copied
    into the existing parameters. A tied LM head shares the embedding's blocks."""
    pieces = read_pieces(gguf_file, config, dequantize)
    loaded: set[str] = set()
    for (path, kind), piece in pieces.items():
        if kind != "weight" or path.endswith(".w_down"):
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if not hasattr(parent, name):
            raise ValueError(
                f"GGUF file {str(gguf_file)!r} holds {path!r}, which "
                f"{type(model).__name__} does not have (a mixture-of-experts file read as a "
                "dense model?)"
            )
        if name == "w_gate_up":  # a layer's stacked experts: gate_up and down together
            down = pieces[(f"{parent_path}.w_down", "weight")]
            block_path, _, attr = parent_path.rpartition(".")
            setattr(model.get_submodule(block_path), attr, _experts(parent, piece, down, experts))
            loaded.add(parent_path)
            continue
        module = getattr(parent, name)
        bias = pieces.get((path, "bias"))
        if isinstance(piece, QuantizedWeight):
            assert matmul is not None, "blocks kept quantized need the backend's matmul"
            if path == "embed_tokens":
                setattr(parent, name, QuantizedEmbedding(piece, dtype))
            else:
                setattr(parent, name, QuantizedLinear(piece, bias, matmul))
        else:
            with torch.no_grad():
                module.weight.copy_(piece.view_as(module.weight))
                if bias is not None:
                    module.bias.copy_(bias)
        loaded.add(path)
    _tie_head(model, config, matmul, loaded)
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        or n == "embed_tokens"
        or n.endswith("norm")
        or hasattr(m, "w_gate_up")
    }
    missing = expected - loaded
    if missing:
        raise ValueError(f"GGUF file {str(gguf_file)!r} lacks tensors for {sorted(missing)[:5]}")


def _experts(
    module: nn.Module, gate_up: Any, down: Any, experts: ExpertsFactory | None
) -> nn.Module:
    """``module`` with float stacks ``[E, 2I, H]`` / ``[E, H, I]`` copied in, or ``experts``'
    quantized form built from per-expert block weights."""
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        with torch.no_grad():
            module.w_gate_up.copy_(gate_up)
            module.w_down.copy_(down)
        return module
    if not (isinstance(gate_up, list) and isinstance(down, list)) or experts is None:
        raise ValueError(
            "GGUF experts mix float and block tensors in one layer; use quantization='none'"
        )
    return experts(gate_up, down, module)


def _tie_head(model: nn.Module, config: Any, matmul: Any, loaded: set[str]) -> None:
    """A tied LM head shares the embedding's weight (its blocks, when quantized)."""
    if not getattr(config, "tie_word_embeddings", False) or "lm_head" in loaded:
        return
    embed = model.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        model.lm_head = QuantizedLinear(embed.qweight, None, matmul)
    else:
        model.lm_head.weight = embed.weight
    loaded.add("lm_head")
