"""Batch-invariant attention for ``--enable-deterministic-inference`` on the CPU: every query
row, prefill or decode, is one task of ``csrc/src/decode_attention.cpp`` over its own keys.

Why this is batch invariant (docs/deterministic.md): the kernel computes a row's attention
with one fixed order (blocks of 32 keys in position order, an online softmax, one partial) as
long as it neither splits the row over several tasks nor reads a shared prefix once for a
group of rows. It does the first only when a call has fewer than ``4 * threads`` rows, the
second only for consecutive rows sharing 128 leading slots. So every call here interleaves a
one-key dummy row between real rows (no two real rows are consecutive) and pads the call to
at least ``4 * threads`` rows. A row's result then depends on its query, its keys and its
values alone: not on the rows beside it, their count, the chunk it was prefilled in, or
whether it is a decode query or the n-th token of an extend. Prefill and decode run the same
code per token, so a token whose KV came from a cache hit (computed in another batch, another
phase) sees bit-identical keys.

Invariant: only float32 (the kernel's type) and no logit softcap (the kernel has none);
:func:`check_supported` refuses the rest by name.
"""

from __future__ import annotations

import torch

from plait.backends.cpu.attention import TorchAttentionBackend, window_slots
from plait.backends.cpu.paged_decode import paged_decode_attention
from plait.core.forward_batch import ForwardBatch

#: real query rows per kernel call in an extend: bounds the [rows, keys] slot table
EXTEND_ROWS_PER_CALL = 256

FLAG = "enable_deterministic_inference (--enable-deterministic-inference)"


def check_supported(attn: TorchAttentionBackend, dtype: torch.dtype) -> None:
    """ValueError naming the flag where this attention cannot be batch invariant."""
    if dtype != torch.float32 or attn.kv_pool.dtype != torch.float32:
        raise ValueError(f"{FLAG} on the CPU needs dtype float32, got {dtype}")
    if any(c is not None for c in attn.logit_softcaps):
        raise ValueError(f"{FLAG} on the CPU does not support attention logit softcapping")


def invariant_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [R, Hq, D]; row r attends to ``slots[r, :lens[r]]`` (positions in order). Each row
    is computed by one task of the kernel, whatever else is in the call (see the module
    docstring)."""
    rows, width = q.shape[0], slots.shape[1]
    total = max(2 * rows, 4 * torch.get_num_threads())
    q_all = q.new_zeros(total, *q.shape[1:])
    q_all[0 : 2 * rows : 2] = q
    slots_all = slots.new_zeros(total, width)
    slots_all[0 : 2 * rows : 2] = slots
    lens_all = torch.ones(total, dtype=torch.long)
    lens_all[0 : 2 * rows : 2] = lens
    out = paged_decode_attention(q_all, k_buffer, v_buffer, slots_all, lens_all, scale)
    return out[0 : 2 * rows : 2]


def extend_rows(
    req_to_token: torch.Tensor, req: int, prefix: int, ext: int, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots [ext, L], lens [ext])`` of request ``req``'s new tokens (positions
    ``prefix..prefix + ext - 1``): each row the slots of the keys its token sees, causal and
    within ``window``, in position order from column 0."""
    pos = torch.arange(prefix, prefix + ext)
    first = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp(min=0)
    lens = pos + 1 - first
    cols = first.unsqueeze(1) + torch.arange(int(lens.max()))
    cols = torch.minimum(cols, pos.unsqueeze(1))  # past a row's end: repeat a valid slot
    return req_to_token[req, cols].long(), lens


class DeterministicAttentionBackend(TorchAttentionBackend):
    """Extend and decode both through :func:`invariant_attention`, one row per token."""

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self._req_rows = batch.req_pool_indices.tolist()
        if batch.is_decode:  # extend builds its rows per call (forward_extend)
            windows = set(self.sliding_windows) or {None}
            self._decode_rows = {
                w: window_slots(
                    batch.req_to_token,
                    batch.req_pool_indices,
                    batch.seq_lens,
                    batch.seq_lens_cpu,
                    w,
                )
                for w in windows
            }

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        slots, lens = self._decode_rows[self.window(layer_id)]
        pool = self.kv_pool
        return invariant_attention(
            q,
            pool.k_buffers[layer_id],
            pool.v_buffers[layer_id],
            slots,
            lens.long(),
            self.scale_of(layer_id),
        )

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        pool, scale = self.kv_pool, self.scale_of(layer_id)
        k, v = pool.k_buffers[layer_id], pool.v_buffers[layer_id]
        out = torch.empty_like(q)
        start = 0
        # the slot table is built per call (not kept for the forward): a long prompt's
        # [tokens, keys] table would be large, and its gather is cheap beside the attention
        for req, prefix, ext in zip(self._req_rows, batch.prefix_lens_cpu, batch.extend_lens_cpu):
            for lo in range(0, ext, EXTEND_ROWS_PER_CALL):
                n = min(EXTEND_ROWS_PER_CALL, ext - lo)
                slots, lens = extend_rows(
                    batch.req_to_token, req, prefix + lo, n, self.window(layer_id)
                )
                rows = slice(start + lo, start + lo + n)
                out[rows] = invariant_attention(q[rows], k, v, slots, lens, scale)
            start += ext
        return out
