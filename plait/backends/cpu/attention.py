"""Reference attention over the paged KV pool in plain torch.

These two functions are the numerical reference every other backend's kernels are certified
against (see ``plait.testing``), and they are what the CPU backend runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plait.core.backend_api import AttentionBackend
from plait.core.forward_batch import ForwardBatch


def extend_attention_ref(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: list[int],
                         prefix_lens: list[int], extend_lens: list[int],
                         scale: float) -> torch.Tensor:
    """q: [T, Hq, D] (requests concatenated); buffers: [S, Hkv, D]. Request b's new tokens sit at
    positions prefix_lens[b].. and see every key at or before their own position.

    The tensors passed to SDPA are 4-D ([1, H, L, D]): for 3-D ones torch takes its math path
    (scores materialized, masks through where/isneginf), 2-5x slower than the fused CPU flash
    kernel it picks for 4-D, which skips the masked-out blocks of a causal prefill."""
    out = torch.empty_like(q)
    start = 0
    for req, prefix, ext in zip(req_pool_indices, prefix_lens, extend_lens):
        total = prefix + ext
        slots = req_to_token[req, :total].long()
        qi = q[start:start + ext].transpose(0, 1).unsqueeze(0)                 # [1, Hq, ext, D]
        # index_select gathers whole [Hkv, D] rows 2-4x faster than advanced indexing
        ki = k_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        vi = v_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        if prefix == 0:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                               enable_gqa=True)
        else:
            rows = torch.arange(ext).unsqueeze(1) + prefix
            mask = torch.arange(total).unsqueeze(0) <= rows  # [ext, total]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask.to(q.device),
                                               scale=scale, enable_gqa=True)
        out[start:start + ext] = o[0].transpose(0, 1)
        start += ext
    return out


def decode_attention_ref(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, Hq, D], one query per request over its first seq_lens[b] slots.

    Batched by padding to the longest sequence: padded keys point at slot 0 and are masked.
    One SDPA call per layer beats a Python loop over requests at every batch size we serve.
    """
    max_len = int(seq_lens.max())
    slots = req_to_token[req_pool_indices, :max_len].long()              # [B, L]
    valid = torch.arange(max_len, device=q.device).unsqueeze(0) < seq_lens.unsqueeze(1)
    slots = slots.masked_fill(~valid, 0)
    k = k_buffer[slots].permute(0, 2, 1, 3).to(q.dtype)                  # [B, Hkv, L, D]
    v = v_buffer[slots].permute(0, 2, 1, 3).to(q.dtype)
    mask = valid[:, None, None, :]                                        # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    return o.squeeze(2)


class TorchAttentionBackend(AttentionBackend):
    """Plain-torch attention: the reference implementation and the CPU default.

    Decode is written as two batched matmuls over the gathered K/V instead of SDPA: with one
    query per request, SDPA's mask and GQA handling cost more than the arithmetic. Everything
    that depends only on the batch (slot gather indices, the padding mask) is built once per
    forward in ``init_forward_metadata``, not once per layer.
    """

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self._req_rows = batch.req_pool_indices.tolist()
        if not batch.is_decode:
            return
        lens = batch.seq_lens_cpu
        max_len = max(lens)
        slots = batch.req_to_token[batch.req_pool_indices, :max_len].long()
        self._bias = None
        # Masked whenever there is more than one request, even if their lengths are equal:
        # whether a mask exists then depends on the batch size alone, so a compiled decode
        # (plait.backends.cpu.graph) needs one graph for batch 1 and one for the rest.
        if len(lens) > 1:
            valid = torch.arange(max_len, device=slots.device)[None, :] < batch.seq_lens[:, None]
            slots = slots.masked_fill(~valid, 0)  # padding reads slot 0, then is masked out
            bias = torch.zeros(valid.shape, dtype=torch.float32, device=slots.device)
            self._bias = bias.masked_fill(~valid, float("-inf"))[:, None, None, :]
        # One flat index for index_select, 2-4x faster than advanced indexing (aten::index)
        # for this gather of whole [Hkv, D] rows; the same values.
        self._slots = slots.reshape(-1)
        self._gather_shape = (*slots.shape, self.num_kv_heads, self.head_dim)

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        pool = self.kv_pool
        return extend_attention_ref(
            q, pool.k_buffers[layer_id], pool.v_buffers[layer_id], batch.req_to_token,
            self._req_rows, batch.prefix_lens_cpu, batch.extend_lens_cpu, self.scale)

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        b, hq, d = q.shape
        hkv = self.num_kv_heads
        pool, shape = self.kv_pool, self._gather_shape
        k = pool.k_buffers[layer_id].index_select(0, self._slots).view(shape).to(q.dtype)
        v = pool.v_buffers[layer_id].index_select(0, self._slots).view(shape).to(q.dtype)
        # k, v: [B, L, Hkv, D]
        qg = q.view(b, hkv, hq // hkv, d)                                 # [B, Hkv, G, D]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * self.scale     # [B, Hkv, G, L]
        if self._bias is not None:
            scores = scores + self._bias
        probs = torch.softmax(scores, dim=-1).to(v.dtype)  # a float32 bias promotes fp16 scores
        return torch.matmul(probs, v.transpose(1, 2)).reshape(b, hq, d)
