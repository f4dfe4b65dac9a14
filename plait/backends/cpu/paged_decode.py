"""The CPU backend's decode attention: ``csrc/src/decode_attention.cpp`` reads each request's K/V rows
in place in the paged pool instead of gathering padded copies (see the source for why).

It is a ``torch.library`` custom op (``plait::paged_decode_attention``) so a compiled decode
(``plait.backends.cpu.graph``) calls it as one opaque node. The torch path of
:class:`~plait.backends.cpu.attention.TorchAttentionBackend` stays the numerical reference; this
backend takes over decode for float32 and bfloat16 KV (the kernel widens bf16 as it reads it; q
and the result are float32 inside), and only when the kernel could be compiled here.
"""

from __future__ import annotations

import logging

import torch

from plait.backends.cpu import cpp_build
from plait.backends.cpu.attention import (
    TorchAttentionBackend,
    decode_over_slots,
    extend_attention_ref,
    window_slots,
)
from plait.backends.cpu.shared_prefix import (
    extend_attention_shared,
    plan_shared_extend,
    shared_groups,
)
from plait.core.forward_batch import ForwardBatch

log = logging.getLogger(__name__)


@torch.library.custom_op("plait::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D]; buffers [S, Hkv, D]; slots [B, L] int64, row b's first seq_lens[b] are
    its KV slots; q float32, buffers float32 or bfloat16. Returns [B, Hq, D] float32."""
    return cpp_build.extension().decode_attention.decode_attention(
        q, k_buffer, v_buffer, slots, seq_lens, scale
    )


@paged_decode_attention.register_fake
def _(q, k_buffer, v_buffer, slots, seq_lens, scale):
    return torch.empty_like(q)


def kernel_available() -> bool:
    """Compile (or load) the kernel; False, with a warning, where it cannot be built."""
    try:
        cpp_build.extension()
    except Exception as e:  # a missing compiler surfaces as several error types
        log.warning("CPU decode-attention kernel unavailable (%s); using the torch path", e)
        return False
    return True


class PagedDecodeAttentionBackend(TorchAttentionBackend):
    """The in-place C++ kernel for decode; for extend, the torch reference, except that requests
    sharing a cached prefix read it once (``shared_prefix.py``; the decode kernel does the same
    for its batch). Float32 or bfloat16 KV (the CPU backend creates it for those pools; the
    kernel checks); a bfloat16 query (the eager bf16 step) is widened and the result rounded
    back.

    Sliding windows: a windowed layer's decode hands the kernel each request's last W slots
    (``window_slots``); its extend goes through the reference with the window (the shared
    prefix cascade reads whole prefixes, so it serves full-attention layers only). A layer with
    a logit softcap (Gemma 2) attends through the torch reference in both phases."""

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        if batch.is_decode:
            self._req_rows = batch.req_pool_indices.tolist()
            self._decode = self._decode_slots(batch, 0)
            return
        super().init_forward_metadata(batch)
        # the trailing one-token items (mixed chunk's decodes, plait.core.mixed) are decode
        # queries: one kernel call for all of them instead of one SDPA call each
        lens = batch.extend_lens_cpu
        self._head = len(lens)
        while self._head > 0 and lens[self._head - 1] == 1:
            self._head -= 1
        self._decode = self._decode_slots(batch, self._head) if self._head < len(lens) else {}
        self._shared_plan = None
        if self.sliding_windows and None not in self.sliding_windows:
            return  # every layer windowed: no layer would use the plan
        rows, prefix = self._req_rows[: self._head], batch.prefix_lens_cpu[: self._head]
        # requests sharing a cached prefix attend to it together (shared_prefix.py)
        groups = shared_groups([batch.req_to_token[r, :n] for r, n in zip(rows, prefix)], prefix)
        self._shared_plan = (
            plan_shared_extend(
                batch.req_to_token,
                rows,
                prefix,
                lens[: self._head],
                groups,
                self.num_heads // self.num_kv_heads,
            )
            if groups
            else None
        )

    def _decode_slots(
        self, batch: ForwardBatch, first: int
    ) -> dict[int | None, tuple[torch.Tensor, torch.Tensor]]:
        """Per sliding window, the decode kernel's ``(slots, lens)`` for requests ``first..``
        of the batch (a decode batch: all of them), each a query at its last position."""
        idx, seq = batch.req_pool_indices[first:], batch.seq_lens[first:]
        seq_cpu = batch.seq_lens_cpu[first:]
        return {
            w: window_slots(batch.req_to_token, idx, seq, seq_cpu, w)
            for w in set(self.sliding_windows) or {None}
        }

    def decode_metadata(self, layer_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_id``'s ``(slots [B, L], seq_lens [B])`` for the decode batch, both
        int64, as the kernel takes them: with a sliding window, each request's last W slots
        (valid after ``init_forward_metadata`` of a decode batch)."""
        slots, lens = self._decode[self.window(layer_id)]
        return slots, lens.long()

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if self._head == batch.batch_size:
            return self._extend_head(q, layer_id, batch)
        split = sum(batch.extend_lens_cpu[: self._head])
        out = torch.empty_like(q)
        out[split:] = self.forward_decode(q[split:], layer_id, batch)
        if split:
            out[:split] = self._extend_head(q[:split], layer_id, batch)
        return out

    def _extend_head(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """Extend attention for the batch's first ``_head`` requests, whose tokens ``q`` is."""
        pool, n = self.kv_pool, self._head
        k, v, scale = pool.k_buffers[layer_id], pool.v_buffers[layer_id], self.scale_of(layer_id)
        window, cap = self.window(layer_id), self.softcap_of(layer_id)
        if self._shared_plan is not None and window is None and cap is None:
            return extend_attention_shared(q, k, v, self._shared_plan, scale)
        return extend_attention_ref(
            q,
            k,
            v,
            batch.req_to_token,
            self._req_rows[:n],
            batch.prefix_lens_cpu[:n],
            batch.extend_lens_cpu[:n],
            scale,
            window,
            cap,
        )

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        pool = self.kv_pool
        slots, lens = self.decode_metadata(layer_id)
        k, v, scale = pool.k_buffers[layer_id], pool.v_buffers[layer_id], self.scale_of(layer_id)
        cap = self.softcap_of(layer_id)
        if cap is not None:  # the C++ kernel has no logit cap: the torch reference does it
            return decode_over_slots(q, k, v, slots, lens, scale, cap)
        return paged_decode_attention(q.float(), k, v, slots, lens, scale).to(q.dtype)
