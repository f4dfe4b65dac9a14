"""Load a GGUF file's tensors straight into Plait's Llama model, keeping Q4_0 / Q4_1 / Q8_0
blocks quantized (:mod:`plait.quant.formats` uses GGUF's own block layout, so codes are copied
and float16 scales/mins are kept as they are: nothing is rounded).

Same conventions as transformers' GGUF loader, which the dequantized ``none`` path uses:
llama.cpp stores the q/k rows of ``llama`` models permuted for its RoPE, so those rows are
permuted back (a row permutation: blocks stay intact); q/k/v and gate/up are fused row-wise
like :mod:`plait.models.loader` does for safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
#: ``general.architecture`` -> its per-layer names (llama.cpp's, as gguf-py's name map spells
#: them). Mixtral files say ``llama`` but hold ``ffn_*_exps`` expert tensors: refused below.
LAYER_NAMES = {
    "llama": _LAYER,
    "qwen2": _LAYER,
    "qwen3": {**_LAYER, **_QK_NORM},
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
}
_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}

Piece = QuantizedWeight | torch.Tensor


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


def _read(tensor: Any) -> Piece:
    kind = tensor.tensor_type.name
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
    if kind in _BLOCKS:
        return block_weight(kind, tensor.data, rows)
    if kind in _FLOATS:
        return torch.from_numpy(np.array(tensor.data)).float()
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


def _cat(pieces: list[Piece], what: str) -> Piece:
    if all(isinstance(p, torch.Tensor) for p in pieces):
        return torch.cat(pieces)
    first = pieces[0]
    same = all(
        isinstance(p, QuantizedWeight)
        and p.bits == first.bits
        and p.group_size == first.group_size
        and (p.mins is None) == (first.mins is None)
        for p in pieces
    )
    if not same:
        raise ValueError(f"{what}: fused GGUF tensors mix block types; use quantization='none'")
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


def layer_names_of(arch: str, tensor_names: list[str]) -> dict[str, tuple[str, int]]:
    """The per-layer name map of ``arch``; a ValueError naming the architecture for one
    Plait does not read natively, or a file holding mixture-of-experts tensors."""
    experts = next((n for n in tensor_names if "_exps." in n or "_shexp" in n), None)
    if experts is not None:
        raise ValueError(
            f"quantization='gguf': the file's {experts!r} is a mixture-of-experts tensor "
            f"(architecture {arch!r}); Plait does not read GGUF experts yet: serve the "
            "safetensors checkpoint"
        )
    if arch not in LAYER_NAMES:
        raise ValueError(
            f"quantization='gguf' does not read GGUF architecture {arch!r} (it reads "
            f"{', '.join(LAYER_NAMES)}); use quantization='none' to run the file dequantized"
        )
    return LAYER_NAMES[arch]


def read_pieces(gguf_file: Path, config: Any) -> dict[tuple[str, str], Piece]:
    """``{(plait module path, "weight"|"bias"): tensor or QuantizedWeight}``, fused and
    un-permuted, straight from the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    arch = _field(reader, "general.architecture")
    layer_names = layer_names_of(arch, [t.name for t in reader.tensors])
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
        piece = _read(tensor)
        if permute and parts[0] == "blk" and parts[2] in heads:
            piece = _unpermute(piece, heads[parts[2]])
        if norm_offset and path.endswith("norm") and isinstance(piece, torch.Tensor):
            piece = piece - norm_offset
        shards.setdefault((path, parts[-1]), {})[shard] = piece
    return {key: _cat([s[i] for i in sorted(s)], key[0]) for key, s in shards.items()}


def load_gguf_weights(
    model: nn.Module, gguf_file: Path, config: Any, dtype: torch.dtype, matmul: QuantizedMatmul
) -> None:
    """Fill ``model`` (already on its device, in ``dtype``) from ``gguf_file``: quantized
    tensors become :class:`QuantizedLinear` / :class:`QuantizedEmbedding`, float tensors are
    copied into the existing parameters. A tied LM head shares the embedding's blocks."""
    pieces = read_pieces(gguf_file, config)
    loaded: set[str] = set()
    for (path, kind), piece in pieces.items():
        if kind != "weight":
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, name)
        bias = pieces.get((path, "bias"))
        if isinstance(piece, QuantizedWeight):
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
    if getattr(config, "tie_word_embeddings", False) and "lm_head" not in loaded:
        embed = model.embed_tokens
        model.lm_head = (
            QuantizedLinear(embed.qweight, None, matmul)
            if isinstance(embed, QuantizedEmbedding)
            else model.lm_head
        )
        if not isinstance(embed, QuantizedEmbedding):
            model.lm_head.weight = embed.weight
        loaded.add("lm_head")
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or n == "embed_tokens" or n.endswith("norm")
    }
    missing = expected - loaded
    if missing:
        raise ValueError(f"GGUF file {str(gguf_file)!r} lacks tensors for {sorted(missing)[:5]}")
