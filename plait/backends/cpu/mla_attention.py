"""Multi-head latent attention over the paged latent pool in plain torch: the CPU backend's,
the reference the Triton latent decode kernel is checked against, and the CUDA backend's
extend (prefill) path.

Absorbed form throughout (``plait.core.mla``): one shared key/value head per token, the key the
whole ``[c | k_rope]`` row, the value its first ``kv_lora_rank`` channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plait.backends.cpu.attention import visible_keys
from plait.core.forward_batch import ForwardBatch
from plait.core.mla import LatentKVPool, MLAAttentionBackend


def mla_extend_ref(
    q: torch.Tensor,
    buffer: torch.Tensor,
    kv_lora_rank: int,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D] (requests concatenated); buffer: [S, 1, D]. Request b's new tokens (at
    positions prefix_lens[b]..) see every row at or before their own position."""
    out = q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)
    start = 0
    for req, prefix, ext in zip(req_pool_indices, prefix_lens, extend_lens):
        slots = req_to_token[req, : prefix + ext].long()
        rows = buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        qi = q[start : start + ext].transpose(0, 1).unsqueeze(0)  # [1, H, ext, D]
        ki, vi = rows, rows[..., :kv_lora_rank]  # [1, 1, L, D], [1, 1, L, R]
        if prefix == 0:
            o = F.scaled_dot_product_attention(
                qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            mask = visible_keys(prefix, ext, 0, None).to(q.device)
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start : start + ext] = o[0].transpose(0, 1)
        start += ext
    return out


def mla_decode_ref(
    q: torch.Tensor,
    buffer: torch.Tensor,
    kv_lora_rank: int,
    slots: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """q: [B, H, D]; ``slots`` [B, L] each request's rows (padding at slot 0 with ``bias``
    [B, 1, L] -inf there). Returns [B, H, kv_lora_rank]."""
    b, length = slots.shape
    rows = buffer.index_select(0, slots.reshape(-1)).view(b, length, -1).to(q.dtype)
    scores = torch.matmul(q, rows.transpose(1, 2)) * scale  # [B, H, L]
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1).to(rows.dtype)
    return torch.matmul(probs, rows[..., :kv_lora_rank])


def decode_slots(batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every decode request's rows padded to the longest: ``(slots [B, L], bias)``, the bias
    [B, 1, L] -inf on padding (None for a single request, which has none)."""
    longest = max(batch.seq_lens_cpu)
    slots = batch.req_to_token[batch.req_pool_indices, :longest].long()
    if batch.batch_size == 1:
        return slots, None
    valid = torch.arange(longest, device=slots.device)[None, :] < batch.seq_lens[:, None]
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=slots.device)
    return slots.masked_fill(~valid, 0), bias.masked_fill(~valid, float("-inf"))[:, None, :]


class TorchMLAAttention(MLAAttentionBackend):
    """The torch implementation of :class:`~plait.core.mla.MLAAttentionBackend`; per-batch
    gathers are built once per forward, not once per layer."""

    def __init__(self, kv_pool: LatentKVPool, num_heads: int, scale: float):
        super().__init__(kv_pool, num_heads, scale)
        self._decode: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._req_rows: list[int] = []

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self._req_rows = batch.req_pool_indices.tolist()
        self._decode = decode_slots(batch) if batch.is_decode else None

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        return mla_extend_ref(
            q,
            self.kv_pool.latent_buffers[layer_id],
            self.kv_lora_rank,
            batch.req_to_token,
            self._req_rows,
            batch.prefix_lens_cpu,
            batch.extend_lens_cpu,
            self.scale,
        )

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        if self._decode is None:
            self.init_forward_metadata(batch)
        assert self._decode is not None
        slots, bias = self._decode
        buffer = self.kv_pool.latent_buffers[layer_id]
        return mla_decode_ref(q, buffer, self.kv_lora_rank, slots, bias, self.scale)
