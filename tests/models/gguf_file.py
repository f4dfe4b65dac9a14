"""Write a transformers checkpoint as a GGUF file the way llama.cpp's converter lays it out,
for tests of GGUF loading on architectures with no small real GGUF at hand.

What follows llama.cpp: tensor names from gguf-py's own name map (``blk.N.attn_q_norm``,
``post_ffw_norm``, ``attn_qkv``, ``ffn_gate_inp_shexp``, ...), ``llama`` q/k rows permuted
for its RoPE (Mixtral is ``llama`` with ``llama.expert_count``), Gemma's RMSNorm weights
stored as ``1 + w``, each layer's experts stacked in 3-D ``ffn_{gate,up,down}_exps``
(``[E, rows, cols]``, as convert_hf_to_gguf stacks them), routers kept F32, the tokenizer as
a byte-level BPE (``tokenizer.ggml.model = gpt2``: tokens, types and merges, cut to the
config's vocabulary), matrices in Q8_0 / Q4_0 / Q4_1 blocks (norms and biases stay F32).
Only the metadata keys a loader reads are written.

``roundtrip``: also save the transformers checkpoint with every matrix replaced by what the
file holds (its blocks dequantized), the oracle for a file transformers cannot read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

#: model_type -> (gguf architecture, its name in gguf-py's MODEL_ARCH)
ARCH = {
    "llama": ("llama", "LLAMA"),
    "qwen2": ("qwen2", "QWEN2"),
    "qwen3": ("qwen3", "QWEN3"),
    "gemma2": ("gemma2", "GEMMA2"),
    "gemma3_text": ("gemma3", "GEMMA3"),
    "mixtral": ("llama", "LLAMA"),
    "qwen2_moe": ("qwen2moe", "QWEN2MOE"),
    "qwen3_moe": ("qwen3moe", "QWEN3MOE"),
    "phi3": ("phi3", "PHI3"),
}
_EXPERTS = re.compile(r"^model\.layers\.(\d+)\..*experts\.(gate_up_proj|down_proj)$")
_ROUTERS = ("ffn_gate_inp", "ffn_gate_inp_shexp")


def _metadata(writer, config, arch: str) -> None:  # type: ignore[no-untyped-def]
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters.get("rope_theta", 10000.0)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch.startswith("gemma"):
        writer.add_sliding_window(config.sliding_window)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def _tokenizer(writer, tokenizer_dir: Path, size: int) -> None:  # type: ignore[no-untyped-def]
    """The tokenizer's first ``size`` tokens and the merges among them (a small vocabulary
    keeps gguf-py's metadata parse, seconds for 49k tokens, short)."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})
    vocab = {t: i for t, i in vocab.items() if i < size}
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    merges = [m for m in merges if all(p in vocab for p in (*m.split(" "), m.replace(" ", "")))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    template = tokenizer_dir / "chat_template.jinja"
    if template.exists():
        writer.add_chat_template(template.read_text())


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its (non-NeoX) RoPE."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _tensors(model, config):  # type: ignore[no-untyped-def]
    """``(transformers name, gguf-py base name or None, float tensor)``: stacked experts
    ``[E, 2I, H]`` split into the gate and up stacks llama.cpp writes."""
    for hf_name, tensor in model.state_dict().items():
        m = _EXPERTS.match(hf_name)
        if m is None:
            base, _, suffix = hf_name.rpartition(".")
            yield hf_name, base, suffix, tensor.detach().float()
            continue
        w, stem = tensor.detach().float(), f"blk.{m[1]}"
        if m[2] == "down_proj":
            yield hf_name, f"{stem}.ffn_down_exps", "weight", w
        else:
            inter = w.shape[1] // 2
            yield hf_name, f"{stem}.ffn_gate_exps", "weight", w[:, :inter]
            yield hf_name, f"{stem}.ffn_up_exps", "weight", w[:, inter:]


def _block_type(full: str, w: torch.Tensor, attn: str, ffn: str):  # type: ignore[no-untyped-def]
    """The block type a matrix is written in (None: F32), as llama.cpp's converter chooses."""
    from gguf import GGMLQuantizationType as Q

    if w.dim() < 2 or w.shape[-1] % 32 or full.split(".")[-2] in _ROUTERS:
        return None
    return Q[ffn] if ".ffn_" in full else Q[attn]


def write_gguf(
    checkpoint: Path,
    out: Path,
    tokenizer_dir: Path,
    *,
    attn: str = "Q8_0",
    ffn: str = "Q4_0",
    roundtrip: Path | None = None,
) -> Path:
    """``checkpoint`` (a saved transformers model) as the GGUF file ``out``: attention
    matrices and the embedding in ``attn`` blocks, MLP and expert matrices in ``ffn`` blocks;
    ``roundtrip``: where to save the checkpoint holding exactly the file's values."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = model.config
    arch, enum = ARCH[config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[enum], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(Path(checkpoint).name)
    _metadata(writer, config, arch)
    _tokenizer(writer, Path(tokenizer_dir), config.vocab_size)
    tied = getattr(config, "tie_word_embeddings", False)
    values: dict[str, list[torch.Tensor]] = {}
    for hf_name, base, suffix, w in _tensors(model, config):
        if tied and hf_name == "lm_head.weight":
            continue
        name = base if base.startswith("blk.") else names.get_name(base)
        assert name is not None, hf_name
        full = f"{name}.{suffix}"
        kind = _block_type(full, w, attn, ffn)
        stored = (
            w
            if kind is None
            else torch.from_numpy(
                gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind)
            )
        )
        values.setdefault(hf_name, []).append(stored)
        if arch == "llama" and name.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if name.endswith("q") else config.num_key_value_heads
            w = _permute(w, heads)
        if arch.startswith("gemma") and name.endswith("norm"):
            w = w + 1
        if kind is not None:
            data = gguf.quants.quantize(w.numpy(), kind)
            writer.add_tensor(full, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            writer.add_tensor(full, np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if roundtrip is not None:
        _save_roundtrip(model, values, roundtrip, Path(checkpoint))
    return out


def _save_roundtrip(model, values, path: Path, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    """``model`` with the file's values (gate and up stacks joined again), saved to ``path``
    with ``checkpoint``'s tokenizer files."""
    import shutil

    state = model.state_dict()
    with torch.no_grad():
        for hf_name, pieces in values.items():
            state[hf_name].copy_(torch.cat(pieces, dim=-2) if len(pieces) > 1 else pieces[0])
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, path / name)
