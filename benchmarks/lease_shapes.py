"""The lease kit's model shapes (``benchmarks.lease_kit``): random-weight Llama checkpoints
built from configs here, nothing downloaded, and the KV bytes a decode step reads.

``smollm2`` is SmolLM2-135M's config (the bundled default model's); ``llama3-8b`` is
Llama-3-8B's published shape (32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
vocabulary 128256, RoPE theta 500000). Both use the default model's tokenizer: ids beyond its
49152 entries decode to nothing, which costs the detokenizer nothing and changes no kernel.
``tiny`` keeps each shape's head ratio and shrinks it to 2 layers of 2 KV heads of 16 (a CPU run in
seconds). Weights are seeded random, initialized on the target device (8B on a CPU would take
minutes) and saved in the run's dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from plait.models.default import default_model_path

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
}
SHAPES = ("smollm2", "llama3-8b")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def shape_config(shape: str, tiny: bool) -> dict[str, Any]:
    """The Llama config dict of ``shape`` (see the module docstring)."""
    config = json.loads((Path(default_model_path()) / "config.json").read_text())
    if shape == "llama3-8b":
        config.update(LLAMA3_8B)
    elif shape != "smollm2":
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if tiny:
        group = config["num_attention_heads"] // config["num_key_value_heads"]
        config.update(
            hidden_size=32 * group,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2 * group,
            num_key_value_heads=2,
            head_dim=16,
        )
    return config


def make_random_model(shape: str, out: Path, tiny: bool, device: str, dtype: str) -> Path:
    """Write (once per ``out``) a seeded random-weight checkpoint of ``shape``."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in shape_config(shape, tiny).items() if k != "dtype"})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    del model
    src = Path(default_model_path())
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def kv_bytes_per_step(config: dict[str, Any], batch: int, context: int, dtype: str) -> int:
    """Bytes of K and V one decode step's attention reads: every layer, every row's
    ``context`` cached tokens, K and V of each KV head."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_key_value_heads"] * head_dim * _BYTES[dtype]
    return config["num_hidden_layers"] * batch * context * per_token
