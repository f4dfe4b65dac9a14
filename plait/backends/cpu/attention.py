"""Reference attention over the paged KV pool in plain torch.

These two functions are the numerical reference every other backend's kernels are certified
against (see ``plait.testing``), and they are what the CPU backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plait.core.backend_api import AttentionBackend
from plait.core.forward_batch import ForwardBatch


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D] (requests concatenated); buffers: [S, Hkv, D]. Request b's new tokens sit at
    positions prefix_lens[b].. and see every key at or before their own position; with a sliding
    ``window`` W only the last W of those (``key > position - W``). ``softcap`` c: scores pass
    ``c * tanh(s / c)`` before the mask (Gemma 2), which SDPA cannot do: such layers take
    :func:`softcapped_attention`.

    The tensors passed to SDPA are 4-D ([1, H, L, D]): for 3-D ones torch takes its math path
    (scores materialized, masks through where/isneginf), 2-5x slower than the fused CPU flash
    kernel it picks for 4-D, which skips the masked-out blocks of a causal prefill."""
    out = torch.empty_like(q)
    start = 0
    for req, prefix, ext in zip(req_pool_indices, prefix_lens, extend_lens):
        total = prefix + ext
        # keys before the first new token's window are seen by no query: never gathered
        first = 0 if window is None else max(0, prefix - window + 1)
        slots = req_to_token[req, first:total].long()
        qi = q[start : start + ext].transpose(0, 1).unsqueeze(0)  # [1, Hq, ext, D]
        # index_select gathers whole [Hkv, D] rows 2-4x faster than advanced indexing
        ki = k_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        vi = v_buffer.index_select(0, slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        if softcap is not None:
            mask = visible_keys(prefix, ext, first, window).to(q.device)
            o = softcapped_attention(qi, ki, vi, mask, scale, softcap)
        elif prefix == 0 and (window is None or window >= ext):
            o = F.scaled_dot_product_attention(
                qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            mask = visible_keys(prefix, ext, first, window).to(q.device)  # [ext, total - first]
            o = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start : start + ext] = o[0].transpose(0, 1)
        start += ext
    return out


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention with capped logits, in transformers' order (scale, ``/c``, tanh, ``*c``, then
    the mask). q: [1, Hq, L, D]; k/v: [1, Hkv, S, D]; mask [L, S] (or broadcastable) bool."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def visible_keys(prefix: int, ext: int, first: int, window: int | None) -> torch.Tensor:
    """[ext, prefix + ext - first] bool: which keys (positions ``first..``) each new token
    (positions ``prefix..prefix + ext - 1``) attends to: causal, and within ``window``."""
    rows = torch.arange(ext).unsqueeze(1) + prefix
    keys = torch.arange(first, prefix + ext).unsqueeze(0)
    mask = keys <= rows
    if window is not None:
        mask &= keys > rows - window
    return mask


def window_slots(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: list[int],
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KV a decode query reads: ``(slots [B, L], lens [B])``, row b's first ``lens[b]``
    entries the slots of request b's last ``min(seq_lens[b], window)`` tokens (all of them
    without a window), in position order; the rest of the row repeats a valid slot."""
    if window is None:
        return req_to_token[req_pool_indices, : max(seq_lens_cpu)].long(), seq_lens
    lens = seq_lens.clamp(max=window)
    width = min(max(seq_lens_cpu), window)
    cols = (seq_lens - lens).unsqueeze(1) + torch.arange(width, device=seq_lens.device)
    cols = torch.minimum(cols, (seq_lens - 1).unsqueeze(1))
    return req_to_token[req_pool_indices.unsqueeze(1), cols].long(), lens


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per request over its first seq_lens[b] slots (with a sliding
    ``window`` W, the last W of them; with ``softcap``, logits capped as in
    :func:`softcapped_attention`).

    Batched by padding to the longest sequence: padded keys point at slot 0 and are masked.
    One SDPA call per layer beats a Python loop over requests at every batch size we serve.
    """
    slots, lens = window_slots(
        req_to_token, req_pool_indices, seq_lens, seq_lens.tolist(), window
    )  # [B, L], [B]
    return decode_over_slots(q, k_buffer, v_buffer, slots, lens, scale, softcap)


def decode_over_slots(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D] over row b's first ``lens[b]`` entries of ``slots`` [B, L]."""
    valid = torch.arange(slots.shape[1], device=q.device).unsqueeze(0) < lens.unsqueeze(1)
    slots = slots.masked_fill(~valid, 0)
    k = k_buffer[slots].permute(0, 2, 1, 3).to(q.dtype)  # [B, Hkv, L, D]
    v = v_buffer[slots].permute(0, 2, 1, 3).to(q.dtype)
    mask = valid[:, None, None, :]  # [B, 1, 1, L]
    if softcap is not None:
        return softcapped_attention(q.unsqueeze(2), k, v, mask, scale, softcap).squeeze(2)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return o.squeeze(2)


@dataclass(frozen=True)
class _DecodeKeys:
    """One sliding window's decode gather, shared by the layers with that window."""

    slots: torch.Tensor  # [B * L] flat slots to gather
    gather_shape: tuple[int, ...]  # (B, L, Hkv, D)
    bias: torch.Tensor | None  # [B, 1, 1, L] 0 / -inf, None when nothing is masked


class TorchAttentionBackend(AttentionBackend):
    """Plain-torch attention: the reference implementation and the CPU default.

    Decode is written as two batched matmuls over the gathered K/V instead of SDPA: with one
    query per request, SDPA's mask and GQA handling cost more than the arithmetic. Everything
    that depends only on the batch (slot gather indices, the padding mask) is built once per
    forward in ``init_forward_metadata``, not once per layer (once per distinct sliding window:
    a windowed decode gathers only the window's keys).
    """

    supports_sliding_window = True
    supports_logit_softcap = True
    supports_layer_scales = True

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        self._req_rows = batch.req_pool_indices.tolist()
        if not batch.is_decode:
            return
        windows = set(self.sliding_windows) or {None}
        self._decode = {w: self._decode_keys(batch, w) for w in windows}

    def _decode_keys(self, batch: ForwardBatch, window: int | None) -> _DecodeKeys:
        slots, lens = window_slots(
            batch.req_to_token, batch.req_pool_indices, batch.seq_lens, batch.seq_lens_cpu, window
        )
        bias = None
        # Masked whenever there is more than one request, even if their lengths are equal:
        # whether a mask exists then depends on the batch size alone, so a compiled decode
        # (plait.backends.cpu.graph) needs one graph for batch 1 and one for the rest.
        if batch.batch_size > 1:
            valid = torch.arange(slots.shape[1], device=slots.device)[None, :] < lens[:, None]
            slots = slots.masked_fill(~valid, 0)  # padding reads slot 0, then is masked out
            bias = torch.zeros(valid.shape, dtype=torch.float32, device=slots.device)
            bias = bias.masked_fill(~valid, float("-inf"))[:, None, None, :]
        # One flat index for index_select, 2-4x faster than advanced indexing (aten::index)
        # for this gather of whole [Hkv, D] rows; the same values.
        return _DecodeKeys(
            slots.reshape(-1), (*slots.shape, self.num_kv_heads, self.head_dim), bias
        )

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        pool = self.kv_pool
        return extend_attention_ref(
            q,
            pool.k_buffers[layer_id],
            pool.v_buffers[layer_id],
            batch.req_to_token,
            self._req_rows,
            batch.prefix_lens_cpu,
            batch.extend_lens_cpu,
            self.scale_of(layer_id),
            self.window(layer_id),
            self.softcap_of(layer_id),
        )

    def forward_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        b, hq, d = q.shape
        hkv = self.num_kv_heads
        keys, pool = self._decode[self.window(layer_id)], self.kv_pool
        k = pool.k_buffers[layer_id].index_select(0, keys.slots).view(keys.gather_shape)
        v = pool.v_buffers[layer_id].index_select(0, keys.slots).view(keys.gather_shape)
        k, v = k.to(q.dtype), v.to(q.dtype)
        # k, v: [B, L, Hkv, D]
        qg = q.view(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * self.scale_of(layer_id)
        cap = self.softcap_of(layer_id)
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap  # [B, Hkv, G, L]
        if keys.bias is not None:
            scores = scores + keys.bias
        probs = torch.softmax(scores, dim=-1).to(v.dtype)  # a float32 bias promotes fp16 scores
        return torch.matmul(probs, v.transpose(1, 2)).reshape(b, hq, d)
