"""Attention inside the jitted step, over one layer's paged cache ``[Hkv, S, D]``.

Two implementations with one signature, ``(q, k_cache, v_cache, inputs, *, scale, page_size,
window=None) -> [T, Hq, D]`` (``window``: the layer's sliding window, static), both reading K/V through ``inputs["slot_table"]`` ``[B, W]`` (request b's
token w lives in slot ``slot_table[b, w]``; entries at ``w >= seq_lens[b]`` point at padding
slot 0 and are masked):

- ``jax``: plain XLA. Decode gathers each request's W slots and runs a masked softmax. Extend
  scores every new token against every request's gathered keys, masked to its own request and
  causally (``[T, B*W]`` scores: fine for a CPU development run, wasteful on a TPU).
- ``pallas``: the paged kernels of :mod:`.pallas_attention` (interpreted off-TPU). Pools with
  pages of at least ``MIN_PAGE`` are read in place through a page table; smaller pages are
  gathered into dense blocks first. Extend runs on Q_TILE-token tiles the host cut.

Padding tokens (past the real ones) belong to request 0 at position 0 and padding requests
have ``seq_len`` 1 over slot 0, so no row's softmax is empty; their outputs are discarded.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from plait.backends.tpu import pallas_attention as pa

Attention = Callable[..., jax.Array]


def _gather(cache: jax.Array, slot_table: jax.Array) -> jax.Array:
    """[Hkv, S, D] at [B, W] slots -> [Hkv, B, W, D]."""
    return cache[:, slot_table]


def jax_decode(q, k_cache, v_cache, inputs, *, scale, page_size, window=None):
    """q [B, Hq, D]: one query per request over its first ``seq_lens[b]`` tokens (the last
    ``window`` of them with a sliding window)."""
    del page_size  # slots are gathered one by one: the layout does not matter
    batch, num_heads, head_dim = q.shape
    k, v = _gather(k_cache, inputs["slot_table"]), _gather(v_cache, inputs["slot_table"])
    num_kv = k.shape[0]
    qg = q.reshape(batch, num_kv, num_heads // num_kv, head_dim).astype(jnp.float32)
    s = jnp.einsum("bhgd,hbwd->bhgw", qg, k.astype(jnp.float32)) * scale
    seq = inputs["seq_lens"][:, None]
    visible = jnp.arange(k.shape[2])[None, :] < seq  # [B, W]
    if window is not None:
        visible &= jnp.arange(k.shape[2])[None, :] >= seq - window
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgw,hbwd->bhgd", p, v.astype(jnp.float32))
    return o.reshape(batch, num_heads, head_dim).astype(q.dtype)


def jax_extend(q, k_cache, v_cache, inputs, *, scale, page_size, window=None):
    """q [T, Hq, D]: token t of request ``token_req[t]`` at ``positions[t]`` sees that
    request's tokens at positions <= its own (and, with a sliding window, > its own - W)."""
    del page_size
    tokens, num_heads, head_dim = q.shape
    table = inputs["slot_table"]
    batch, width = table.shape
    k, v = _gather(k_cache, table), _gather(v_cache, table)
    num_kv = k.shape[0]
    k = k.reshape(num_kv, batch * width, head_dim).astype(jnp.float32)
    v = v.reshape(num_kv, batch * width, head_dim).astype(jnp.float32)
    qg = q.reshape(tokens, num_kv, num_heads // num_kv, head_dim).astype(jnp.float32)
    s = jnp.einsum("thgd,hkd->thgk", qg, k) * scale  # k = b*W+w
    key_req = jnp.repeat(jnp.arange(batch), width)
    key_pos = jnp.tile(jnp.arange(width), batch)
    seq = inputs["seq_lens"][key_req]
    visible = (
        (key_req[None, :] == inputs["token_req"][:, None])
        & (key_pos[None, :] <= inputs["positions"][:, None])
        & (key_pos < seq)[None, :]
    )  # [T, B*W]
    if window is not None:
        visible &= key_pos[None, :] > inputs["positions"][:, None] - window
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("thgk,hkd->thgd", p, v)
    return o.reshape(tokens, num_heads, head_dim).astype(q.dtype)


def _pages(k_cache, v_cache, inputs, page_size):
    """(k_pages, v_pages, page_table) for the Pallas kernels (see pallas_attention)."""
    table, seq = inputs["slot_table"], inputs["seq_lens"]
    if page_size >= pa.MIN_PAGE:
        width = table.shape[1] // page_size
        pages = table[:, ::page_size] // page_size
        live = jnp.arange(width)[None, :] * page_size < seq[:, None]
        return (
            pa.as_pages(k_cache, page=page_size),
            pa.as_pages(v_cache, page=page_size),
            jnp.where(live, pages, 0).astype(jnp.int32),
        )
    return pa.gather_dense_pages(k_cache, v_cache, table, block=pa.DENSE_BLOCK)


def pallas_decode(q, k_cache, v_cache, inputs, *, scale, page_size, interpret, window=None):
    k_pages, v_pages, table = _pages(k_cache, v_cache, inputs, page_size)
    return pa.paged_decode(
        q,
        k_pages,
        v_pages,
        table,
        inputs["seq_lens"],
        scale=scale,
        interpret=interpret,
        window=window,
    )


def pallas_extend(q, k_cache, v_cache, inputs, *, scale, page_size, interpret, window=None):
    k_pages, v_pages, table = _pages(k_cache, v_cache, inputs, page_size)
    tokens = q.shape[0]
    q_pad = jnp.concatenate([q, jnp.zeros((1, *q.shape[1:]), q.dtype)])  # row T: padding
    out = pa.paged_extend(
        q_pad[inputs["q_index"]],
        k_pages,
        v_pages,
        inputs["tile_req"],
        inputs["tile_pos0"],
        table,
        inputs["seq_lens"],
        scale=scale,
        interpret=interpret,
        window=window,
    )
    return out.reshape(-1, *q.shape[1:])[inputs["out_index"]][:tokens]
