"""The TPU backend's KV pool (jax arrays on the device) and Pallas attention behind the core's
torch contract. Tensors cross between torch (host) and jax through DLPack.

The engine's path does not use :class:`PallasAttentionBackend`: the JAX model runner
(:mod:`.model_runner`) calls the kernels inside its jitted steps and updates the pool's arrays
itself. This torch-facing wrapper is what the conformance kit certifies the kernels through.

Per-batch index metadata (page tables, extend tiles) is built with torch on the host each call:
it is a few small integer gathers, and building it per call keeps graph replays (which reuse
one batch object with new contents) correct.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import torch

from plait.backends.tpu import pallas_attention as pa
from plait.backends.tpu import step_inputs
from plait.core.backend_api import AttentionBackend, KVPool
from plait.core.forward_batch import ForwardBatch

JAX_DTYPES = {torch.float32: jnp.float32, torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16}


def to_jax(t: torch.Tensor, device: Any) -> jax.Array:
    if t.dtype == torch.int64:
        t = t.to(torch.int32)  # jax runs without x64 by default
    return jax.device_put(jax.dlpack.from_dlpack(t.detach().contiguous()), device)


def to_torch(x: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(jax.device_put(x, jax.devices("cpu")[0]))


def _scatter_rows(buf, loc, x):
    # buf [Hkv, S, D]; x [T, Hkv, D]
    return buf.at[:, loc].set(jnp.swapaxes(x, 0, 1).astype(buf.dtype))


_scatter = jax.jit(_scatter_rows)
_scatter_donated = jax.jit(_scatter_rows, donate_argnums=(0,))  # in place where XLA can (TPU)


class JaxKVPool(KVPool):
    """Head-major pool: ``k_buffers[layer]`` is a jax array ``[Hkv, S, D]`` on the jax device,
    so a (head, page) is a contiguous ``(page, D)`` tile for the kernels' DMAs. Only ``set_kv``
    is part of the core's contract; it takes torch tensors."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        page_size: int,
        jax_device: Any,
    ):
        if dtype not in JAX_DTYPES:
            raise ValueError(f"dtype must be one of {list(JAX_DTYPES)}, got {dtype}")
        self.num_slots, self.page_size, self.num_layers = num_slots, page_size, num_layers
        self.dtype = dtype
        self.device = torch.device("cpu")  # where the torch side of the contract lives
        self.jax_device = jax_device
        size = num_slots + page_size
        shape = (num_kv_heads, size, head_dim)
        self.k_buffers = [
            jax.device_put(jnp.zeros(shape, JAX_DTYPES[dtype]), jax_device)
            for _ in range(num_layers)
        ]
        self.v_buffers = [
            jax.device_put(jnp.zeros(shape, JAX_DTYPES[dtype]), jax_device)
            for _ in range(num_layers)
        ]
        self._donate = jax_device.platform == "tpu"

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n = loc.numel()
        if n == 0:
            return
        # Pad to a power of two with writes to slot 0 (padding) so jit compiles a few shapes.
        pad = pa.bucket(n, 8) - n
        loc = torch.cat([loc.reshape(-1).to(torch.int64), loc.new_zeros(pad, dtype=torch.int64)])
        k = torch.cat([k, k.new_zeros(pad, *k.shape[1:])]).to(self.dtype)
        v = torch.cat([v, v.new_zeros(pad, *v.shape[1:])]).to(self.dtype)
        scatter = _scatter_donated if self._donate else _scatter
        jloc = to_jax(loc, self.jax_device)
        self.k_buffers[layer_id] = scatter(
            self.k_buffers[layer_id], jloc, to_jax(k, self.jax_device)
        )
        self.v_buffers[layer_id] = scatter(
            self.v_buffers[layer_id], jloc, to_jax(v, self.jax_device)
        )


class PallasAttentionBackend(AttentionBackend):
    """Pallas kernels over a :class:`JaxKVPool`; q and outputs are torch tensors on the host.
    Each layer's sliding window goes to the kernels as their static ``window``."""

    supports_sliding_window = True

    def __init__(
        self,
        kv_pool: JaxKVPool,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        interpret: bool | None = None,
    ):
        super().__init__(kv_pool, num_heads, num_kv_heads, head_dim)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        self.interpret = pa.interpret_mode() if interpret is None else interpret

    def _pages(self, layer_id: int, rows: torch.Tensor, seq_lens: torch.Tensor):
        """(k_pages, v_pages, page_table) for requests whose token slots are ``rows`` [B, L]."""
        pool: JaxKVPool = self.kv_pool
        ps, dev = pool.page_size, pool.jax_device
        k_buf, v_buf = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
        max_seq = int(seq_lens.max()) if seq_lens.numel() else 1
        if ps >= pa.MIN_PAGE:
            width = pa.bucket(-(-max_seq // ps))
            table = _padded(rows, width * ps)[:, ::ps] // ps
            live = torch.arange(width)[None, :] * ps < seq_lens[:, None]
            table = torch.where(live, table, 0)  # past the end: the padding page
            return (pa.as_pages(k_buf, page=ps), pa.as_pages(v_buf, page=ps), to_jax(table, dev))
        length = pa.bucket(max_seq, pa.DENSE_BLOCK)
        slots = _padded(rows, length)
        slots = torch.where(torch.arange(length)[None, :] < seq_lens[:, None], slots, 0)
        return pa.gather_dense_pages(k_buf, v_buf, to_jax(slots, dev), block=pa.DENSE_BLOCK)

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        bs = q.shape[0]
        padded = pa.bucket(bs)
        seq = _pad_rows(batch.seq_lens.cpu(), padded)  # padded requests: length 0, output 0
        req = _pad_rows(batch.req_pool_indices.cpu(), padded)
        rows = batch.req_to_token.cpu()[req]
        k_pages, v_pages, table = self._pages(layer_id, rows, seq)
        dev = self.kv_pool.jax_device
        out = pa.paged_decode(
            to_jax(_pad_rows(q, padded), dev),
            k_pages,
            v_pages,
            table,
            to_jax(seq, dev),
            scale=self.scale,
            interpret=self.interpret,
            window=self.window(layer_id),
        )
        return to_torch(out)[:bs].to(q.dtype)

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        t = q.shape[0]
        if t == 0:
            return torch.empty_like(q)
        tiles = _extend_tiles(batch.prefix_lens_cpu, batch.extend_lens_cpu)
        tile_req, tile_pos0, q_index, out_index = tiles
        seq = batch.seq_lens.cpu()
        rows = batch.req_to_token.cpu()[batch.req_pool_indices.cpu()]
        k_pages, v_pages, table = self._pages(layer_id, rows, seq)
        q_pad = torch.cat([q, q.new_zeros(1, *q.shape[1:])])  # row t: zeros for padding
        q_tiles = q_pad[q_index]  # [NT, Q_TILE, Hq, D]
        dev = self.kv_pool.jax_device
        out = pa.paged_extend(
            to_jax(q_tiles, dev),
            k_pages,
            v_pages,
            to_jax(tile_req, dev),
            to_jax(tile_pos0, dev),
            table,
            to_jax(seq, dev),
            scale=self.scale,
            interpret=self.interpret,
            window=self.window(layer_id),
        )
        out = to_torch(out).reshape(-1, *q.shape[1:])
        return out[out_index].to(q.dtype)


def _extend_tiles(prefix_lens: list[int], extend_lens: list[int]):
    """:func:`step_inputs.extend_tiles` with the tile count bucketed to a power of two, as
    torch tensors (tile_req, tile_pos0, q_index, out_index); row T of q is the padding row."""
    count = sum(-(-n // pa.Q_TILE) for n in extend_lens)
    tiles = step_inputs.extend_tiles(prefix_lens, extend_lens, pa.bucket(count), sum(extend_lens))
    return tuple(
        torch.from_numpy(tiles[k]).to(torch.int64)
        for k in ("tile_req", "tile_pos0", "q_index", "out_index")
    )


def _padded(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Columns [0, width) of rows, zero-filled past the table's end."""
    if rows.shape[1] >= width:
        return rows[:, :width].to(torch.int64)
    return torch.nn.functional.pad(rows.to(torch.int64), (0, width - rows.shape[1]))


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[0] == n else torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])
