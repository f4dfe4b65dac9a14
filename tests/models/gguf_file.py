"""Write a transformers checkpoint as a GGUF file the way llama.cpp's converter lays it out,
for tests of GGUF loading on architectures with no small real GGUF at hand.

What follows llama.cpp: tensor names from gguf-py's own name map (``blk.N.attn_q_norm``,
``post_ffw_norm``, ...), ``llama`` q/k rows permuted for its RoPE, Gemma's RMSNorm weights
stored as ``1 + w``, the tokenizer as a byte-level BPE (``tokenizer.ggml.model = gpt2``:
tokens, types and merges), matrices in Q8_0 or Q4_0 blocks (norms and biases stay F32).
Only the metadata keys a loader reads are written.
"""

from __future__ import annotations

import json
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
}


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


def _tokenizer(writer, tokenizer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec["added_tokens"] if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    template = tokenizer_dir / "chat_template.jinja"
    if template.exists():
        writer.add_chat_template(template.read_text())


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its (non-NeoX) RoPE."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(
    checkpoint: Path, out: Path, tokenizer_dir: Path, *, attn: str = "Q8_0", ffn: str = "Q4_0"
) -> Path:
    """``checkpoint`` (a saved transformers model) as the GGUF file ``out``: attention
    matrices and the embedding in ``attn`` blocks, MLP matrices in ``ffn`` blocks."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = model.config
    arch, enum = ARCH[config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[enum], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(Path(checkpoint).name)
    _metadata(writer, config, arch)
    _tokenizer(writer, Path(tokenizer_dir))
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        assert name is not None, hf_name
        w = tensor.detach().float()
        if arch == "llama" and name.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if name.endswith("q") else config.num_key_value_heads
            w = _permute(w, heads)
        if arch.startswith("gemma") and name.endswith("norm"):
            w = w + 1
        full = f"{name}.{suffix}"
        if w.dim() == 2 and w.shape[1] % 32 == 0:
            kind = Q[ffn] if ".ffn_" in full else Q[attn]
            data = gguf.quants.quantize(w.numpy(), kind)
            writer.add_tensor(full, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            writer.add_tensor(full, np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
