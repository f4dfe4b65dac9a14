"""A Llama-family checkpoint as a pytree of ``jax.Array``s on one device, loaded once.

Reads the same safetensors directory as :func:`plait.models.loader.load_model` (a GGUF file is
converted into that directory first by ``resolve_model_dir``), with the same fusions: q/k/v into
one ``qkv`` matrix and gate/up into one ``gate_up`` matrix per layer. Matrices are stored
``[in, out]`` so the forward is ``x @ w``. RoPE tables come from
:class:`plait.models.llama.RotaryEmbedding` (host arithmetic, once), so every scaling type the
torch model supports is supported here with identical values.

Pytree (a plain dict; optional biases are absent rather than zero, so the jitted forward's
structure says which exist)::

    embed [V, H]   lm_head [H, V]   norm [H]   rope_cos, rope_sin [context, D] (float32)
    layers: list of {input_norm [H], qkv [H, Q+2K] (+ qkv_bias), o [Q, H] (+ o_bias),
                     post_norm [H], gate_up [H, 2I] (+ gate_up_bias), down [I, H] (+ down_bias)}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from plait.models.llama import RotaryEmbedding, head_dim_of

# Our name for each HF module (per layer), and the HF modules fused into it, in order.
_LAYER_MODULES = {
    "input_norm": ("input_layernorm",),
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "post_norm": ("post_attention_layernorm",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
_NORMS = {"input_norm", "post_norm"}


def load_params(model_dir: Path, config: Any, dtype: Any, device: Any, context_len: int) -> dict:
    """Every weight of the checkpoint in ``model_dir`` as ``dtype`` arrays on ``device``.

    Raises ValueError naming the missing tensors when the checkpoint is incomplete."""
    import jax
    import jax.numpy as jnp

    tensors = _read_safetensors(model_dir)

    def put(x: np.ndarray, as_dtype: Any = dtype) -> jax.Array:
        return jax.device_put(jnp.asarray(x, dtype=as_dtype), device)

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weight {name!r}")
        return tensors.pop(name)

    layers = []
    for i in range(config.num_hidden_layers):
        layer = {}
        for ours, modules in _LAYER_MODULES.items():
            prefix = [f"layers.{i}.{m}" for m in modules]
            if ours in _NORMS:
                layer[ours] = put(take(prefix[0] + ".weight"))
                continue
            layer[ours] = put(np.concatenate([take(p + ".weight") for p in prefix]).T)
            if prefix[0] + ".bias" in tensors:
                layer[ours + "_bias"] = put(np.concatenate([take(p + ".bias") for p in prefix]))
        layers.append(layer)
    embed = take("embed_tokens.weight")
    tied = getattr(config, "tie_word_embeddings", False)
    lm_head = embed if tied and "lm_head.weight" not in tensors else take("lm_head.weight")
    rotary = RotaryEmbedding(config, head_dim_of(config), context_len)
    return {
        "embed": put(embed),
        "lm_head": put(lm_head.T),
        "norm": put(take("norm.weight")),
        "rope_cos": put(rotary.cos.numpy(), jnp.float32),
        "rope_sin": put(rotary.sin.numpy(), jnp.float32),
        "layers": layers,
    }


def _read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy arrays, names without the ``model.`` prefix (rotary
    buffers dropped). Read through torch because numpy has no bfloat16."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {str(model_dir)!r}")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                key = name.removeprefix("model.")
                out[key] = f.get_tensor(name).to(torch.float32).numpy()
    return out
