"""The Llama-family forward (Llama, SmolLM2, Mistral, Qwen2) as one pure JAX function.

It mirrors :mod:`plait.models.llama` op for op (float32 RMSNorm, RoPE as ``x * cos +
rotate_half(x) * sin`` from the same tables, fused qkv and gate/up matmuls, SiLU-gated MLP,
each layer's sliding window) so greedy outputs match the torch CPU backend token for token in
float32.

``forward(params, k_caches, v_caches, inputs)`` returns ``(logits [R, V] float32, k_caches,
v_caches)``: the caches are per-layer ``[Hkv, S, D]`` arrays, updated functionally (the new
tokens' K/V written at ``inputs["out_loc"]``) and returned, so the caller can donate the old
buffers and XLA updates them in place. ``inputs`` holds int32 arrays whose shapes are the jit
bucket (see :mod:`.model_runner` for their meaning). Everything static (head counts, the
attention implementation) is bound by :func:`make_forward` before ``jax.jit``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from plait.models.llama import head_dim_of
from plait.models.sliding_window import layer_windows


@dataclass(frozen=True)
class LlamaShape:
    """The static numbers the forward needs from an HF config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    #: layer i's sliding window (None: full attention), as ``plait.models.sliding_window``
    #: gives it; empty: no layer has one
    sliding_windows: tuple[int | None, ...] = ()

    @classmethod
    def of(cls, config: Any, context_len: int) -> "LlamaShape":
        """The shape of ``config``'s model served with contexts of up to ``context_len``."""
        return cls(
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim_of(config),
            float(config.rms_norm_eps),
            layer_windows(config, context_len),
        )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return weight * h.astype(x.dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate((-x[..., half:], x[..., :half]), axis=-1)


def _linear(x: jax.Array, layer: dict, name: str) -> jax.Array:
    y = x @ layer[name]
    bias = layer.get(name + "_bias")
    return y if bias is None else y + bias


def _layer(
    x,
    layer,
    k_cache,
    v_cache,
    inputs,
    rope,
    shape: LlamaShape,
    attend: Callable,
    window: int | None,
):
    t = x.shape[0]
    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    h = rms_norm(x, layer["input_norm"], shape.rms_norm_eps)
    q, k, v = jnp.split(_linear(h, layer, "qkv"), (hq * d, (hq + hkv) * d), axis=-1)
    qk = jnp.concatenate((q.reshape(t, hq, d), k.reshape(t, hkv, d)), axis=1)
    cos, sin = rope
    qk = qk * cos + _rotate_half(qk) * sin
    q, k = qk[:, :hq], qk[:, hq:]
    v = v.reshape(t, hkv, d)
    loc = inputs["out_loc"]
    k_cache = k_cache.at[:, loc].set(jnp.swapaxes(k, 0, 1).astype(k_cache.dtype))
    v_cache = v_cache.at[:, loc].set(jnp.swapaxes(v, 0, 1).astype(v_cache.dtype))
    o = attend(q, k_cache, v_cache, inputs, scale=d**-0.5, window=window)
    x = x + _linear(o.reshape(t, hq * d), layer, "o")
    h = rms_norm(x, layer["post_norm"], shape.rms_norm_eps)
    gate, up = jnp.split(_linear(h, layer, "gate_up"), 2, axis=-1)
    return x + _linear(jax.nn.silu(gate) * up, layer, "down"), k_cache, v_cache


def forward(
    params: dict,
    k_caches: list,
    v_caches: list,
    inputs: dict,
    *,
    shape: LlamaShape,
    attend: Callable,
):
    x = params["embed"][inputs["input_ids"]]
    pos = inputs["positions"]
    rope = (
        params["rope_cos"][pos][:, None, :].astype(x.dtype),
        params["rope_sin"][pos][:, None, :].astype(x.dtype),
    )
    new_k, new_v = [], []
    windows = shape.sliding_windows or (None,) * len(params["layers"])
    for layer, k_cache, v_cache, window in zip(params["layers"], k_caches, v_caches, windows):
        x, k_cache, v_cache = _layer(
            x, layer, k_cache, v_cache, inputs, rope, shape, attend, window
        )
        new_k.append(k_cache)
        new_v.append(v_cache)
    x = rms_norm(x[inputs["logit_rows"]], params["norm"], shape.rms_norm_eps)
    return (x @ params["lm_head"]).astype(jnp.float32), new_k, new_v


def make_forward(shape: LlamaShape, attend: Callable) -> Callable:
    """``forward`` with its static configuration bound, ready for ``jax.jit``."""
    return functools.partial(forward, shape=shape, attend=attend)
