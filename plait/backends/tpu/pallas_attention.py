"""Paged attention in JAX/Pallas: decode and extend over a head-major paged KV pool.

Layout: a layer's K (and V) is ``[Hkv, S, D]``, viewed as pages ``[Hkv, S // page, page, D]``, so
one (head, page) is a contiguous ``(page, D)`` tile - the unit a TPU grid step DMAs into VMEM.
Which page a grid step reads is data: the page table is *scalar-prefetched* into SMEM and the K/V
BlockSpecs' index maps look it up (the pattern of JAX's own TPU paged-attention kernel). The
last grid axis walks a request's pages in order while an online softmax (running max, sum and
accumulator in VMEM scratch) folds them in; the output tile is written on the last page.

Page 0 is the padding page: page-table entries past a request's pages point at it, so the DMA
always reads valid memory, and the masks (key position < seq_len, causal) make it weigh nothing.
A sliding window (static ``window``, one per layer) adds ``query_pos - key_pos < window`` to
the masks and skips the pages wholly before it.

Pools with small pages (page_size 1) are first gathered into dense 16-token blocks with a
synthetic page table, so the same kernels serve both layouts.

Shapes that reach ``jax.jit`` are bucketed to powers of two (batch, pages, tiles, tokens), so a
server compiles each kernel a handful of times, not once per step. On a machine without a TPU
the kernels run with ``interpret=True`` (that is how CI checks them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MIN_PAGE = 8  # TPU sublane count: smaller pages are regrouped into dense blocks first
DENSE_BLOCK = 16
Q_TILE = 16  # new tokens per extend tile


def interpret_mode() -> bool:
    return jax.default_backend() != "tpu"


def bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# -- the online-softmax step shared by both kernels ---------------------------------------------


def _attend_page(q, k_ref, v_ref, visible, m_ref, l_ref, acc_ref, scale):
    """Fold one page into the running softmax. q: [R, D] f32; visible: [R, page] bool."""
    k = k_ref[...].astype(jnp.float32)  # [page, D]
    v = v_ref[...].astype(jnp.float32)
    s = (
        jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        * scale
    )  # [R, page]
    s = jnp.where(visible, s, -jnp.inf)
    m_prev = m_ref[...]  # [R, 1]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing visible yet: keep exp at 0
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_ref[...] = l_ref[...] * alpha + p.sum(axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * alpha + jnp.dot(p, v, preferred_element_type=jnp.float32)
    m_ref[...] = m_new


def _init(m_ref, l_ref, acc_ref):
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def _finish(o_ref, l_ref, acc_ref):
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _scratch(rows: int, head_dim: int):
    return [
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, head_dim), jnp.float32),
    ]


# -- decode -------------------------------------------------------------------------------------


def _decode_kernel(
    page_table, seq_lens, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, scale, page, window
):
    b, p = pl.program_id(0), pl.program_id(2)
    seq = seq_lens[b]
    first = 0 if window is None else jnp.maximum(seq - window, 0)  # the window's first key

    @pl.when(p == 0)
    def _():
        _init(m_ref, l_ref, acc_ref)

    @pl.when((p * page < seq) & ((p + 1) * page > first))
    def _():
        q = q_ref[...].astype(jnp.float32)  # [G, D]
        pos = p * page + jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], page), 1)
        _attend_page(q, k_ref, v_ref, (pos < seq) & (pos >= first), m_ref, l_ref, acc_ref, scale)

    @pl.when(p == pl.num_programs(2) - 1)
    def _():
        _finish(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "window"))
def paged_decode(q, k_pages, v_pages, page_table, seq_lens, *, scale, interpret, window=None):
    """q [B, Hq, D]; pages [Hkv, NP, page, D]; page_table [B, P] int32; seq_lens [B] int32.
    ``window``: a sliding window W (each query reads its request's last W keys), or None."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page, _ = k_pages.shape
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    tile = (None, None, group, head_dim)
    kv_tile = (None, None, page, head_dim)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_kv_heads, page_table.shape[1]),
        in_specs=[
            pl.BlockSpec(tile, lambda b, h, p, pt, sl: (b, h, 0, 0)),
            pl.BlockSpec(kv_tile, lambda b, h, p, pt, sl: (h, pt[b, p], 0, 0)),
            pl.BlockSpec(kv_tile, lambda b, h, p, pt, sl: (h, pt[b, p], 0, 0)),
        ],
        out_specs=pl.BlockSpec(tile, lambda b, h, p, pt, sl: (b, h, 0, 0)),
        scratch_shapes=_scratch(group, head_dim),
    )
    out = pl.pallas_call(
        functools.partial(_decode_kernel, scale=scale, page=page, window=window),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
    )(page_table, seq_lens, qg, k_pages, v_pages)
    return out.reshape(batch, num_heads, head_dim)


# -- extend -------------------------------------------------------------------------------------


def _extend_kernel(
    tile_req,
    tile_pos0,
    page_table,
    seq_lens,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_ref,
    l_ref,
    acc_ref,
    *,
    scale,
    page,
    group,
    window,
):
    t, p = pl.program_id(0), pl.program_id(2)
    b = tile_req[t]
    seq, pos0 = seq_lens[b], tile_pos0[t]
    rows = q_ref.shape[0]  # Q_TILE tokens x group heads, token-major
    # the first key the tile's first token sees (its sliding window's start)
    first = 0 if window is None else pos0 - window + 1

    @pl.when(p == 0)
    def _():
        _init(m_ref, l_ref, acc_ref)

    # Skip pages past the sequence, wholly after this tile's last token (causal) or wholly
    # before its first token's window.
    @pl.when((p * page < seq) & (p * page <= pos0 + rows // group - 1) & ((p + 1) * page > first))
    def _():
        q = q_ref[...].astype(jnp.float32)
        q_pos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (rows, page), 0) // group
        k_pos = p * page + jax.lax.broadcasted_iota(jnp.int32, (rows, page), 1)
        visible = (k_pos <= q_pos) & (k_pos < seq)
        if window is not None:
            visible &= q_pos - k_pos < window
        _attend_page(q, k_ref, v_ref, visible, m_ref, l_ref, acc_ref, scale)

    @pl.when(p == pl.num_programs(2) - 1)
    def _():
        _finish(o_ref, l_ref, acc_ref)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "window"))
def paged_extend(
    q_tiles,
    k_pages,
    v_pages,
    tile_req,
    tile_pos0,
    page_table,
    seq_lens,
    *,
    scale,
    interpret,
    window=None,
):
    """q_tiles [NT, Q_TILE, Hq, D]: each tile holds up to Q_TILE consecutive new tokens of
    request ``tile_req[t]``, the first at absolute position ``tile_pos0[t]``. Returns the same
    shape. Pages as in :func:`paged_decode`; ``window``: a sliding window W (a token sees
    the keys less than W positions before it), or None."""
    num_tiles, q_tile, num_heads, head_dim = q_tiles.shape
    num_kv_heads, _, page, _ = k_pages.shape
    group = num_heads // num_kv_heads
    # [NT, Hkv, Q_TILE * G, D]: the rows one KV head serves, token-major.
    qg = q_tiles.reshape(num_tiles, q_tile, num_kv_heads, group, head_dim)
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(num_tiles, num_kv_heads, q_tile * group, head_dim)
    tile = (None, None, q_tile * group, head_dim)
    kv_tile = (None, None, page, head_dim)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(num_tiles, num_kv_heads, page_table.shape[1]),
        in_specs=[
            pl.BlockSpec(tile, lambda t, h, p, tr, tp, pt, sl: (t, h, 0, 0)),
            pl.BlockSpec(kv_tile, lambda t, h, p, tr, tp, pt, sl: (h, pt[tr[t], p], 0, 0)),
            pl.BlockSpec(kv_tile, lambda t, h, p, tr, tp, pt, sl: (h, pt[tr[t], p], 0, 0)),
        ],
        out_specs=pl.BlockSpec(tile, lambda t, h, p, tr, tp, pt, sl: (t, h, 0, 0)),
        scratch_shapes=_scratch(q_tile * group, head_dim),
    )
    out = pl.pallas_call(
        functools.partial(_extend_kernel, scale=scale, page=page, group=group, window=window),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q_tiles.dtype),
        interpret=interpret,
    )(tile_req, tile_pos0, page_table, seq_lens, qg, k_pages, v_pages)
    out = out.reshape(num_tiles, num_kv_heads, q_tile, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(num_tiles, q_tile, num_heads, head_dim)


# -- layouts ------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("page",))
def as_pages(buf, page):
    """[Hkv, S, D] -> [Hkv, S // page, page, D] (a free reshape)."""
    hkv, s, d = buf.shape
    return buf.reshape(hkv, s // page, page, d)


@functools.partial(jax.jit, static_argnames=("block",))
def gather_dense_pages(k_buf, v_buf, slot_table, *, block):
    """For small pages: gather each request's slots [B, L] (L a multiple of ``block``; padding
    entries point at slot 0) into dense pages; request b's j-th block is page b * (L//block) + j.
    Returns (k_pages, v_pages, page_table)."""
    batch, length = slot_table.shape
    per_req = length // block
    hkv, _, d = k_buf.shape
    k = k_buf[:, slot_table.reshape(-1)].reshape(hkv, batch * per_req, block, d)
    v = v_buf[:, slot_table.reshape(-1)].reshape(hkv, batch * per_req, block, d)
    table = (
        jnp.arange(batch, dtype=jnp.int32)[:, None] * per_req
        + jnp.arange(per_req, dtype=jnp.int32)[None, :]
    )
    return k, v, table
