"""Extend attention that reads a prefix shared by several requests once (cascade attention).

When the radix cache hands several requests of one extend batch the same cached KV slots (a
system prompt, a few-shot preamble, the branches of a ``fork``), the reference
(:func:`~plait.backends.cpu.attention.extend_attention_ref`) gathers that prefix and attends to
it once per request: 31 requests on a 1,000-token prefix run 31 flash-attention calls a layer
over the same keys. Here the new tokens of every request in such a group attend to the shared
keys in one call (their queries stacked, no mask: every new token sees the whole prefix), each
request then attends to its own remaining keys (causal), and the two softmax partials are
merged by their log-sum-exp. The result is the reference's up to float rounding (the sum runs
in another order).

What holds: a group is consecutive requests of the batch whose first ``length`` slots are the
same, ``length`` at least :data:`MIN_SHARED` and at most every member's cached prefix (new
tokens' slots are never shared).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: shortest common prefix worth a shared call (shorter ones gain less than the merge costs)
MIN_SHARED = 128


@dataclass(frozen=True)
class SharedGroup:
    """Requests ``first .. first + count - 1`` of the batch share their first ``length`` slots."""

    first: int
    count: int
    length: int


def shared_groups(slot_rows: list[torch.Tensor], prefix_lens: list[int]) -> list[SharedGroup]:
    """Groups of two or more consecutive requests sharing at least :data:`MIN_SHARED` cached
    slots. ``slot_rows[b]`` holds request b's slots, at least ``prefix_lens[b]`` of them."""
    groups: list[SharedGroup] = []
    b, n = 0, len(slot_rows)
    while b < n:
        count, length = 1, prefix_lens[b]
        while b + count < n and length >= MIN_SHARED:
            prev, nxt = slot_rows[b + count - 1], slot_rows[b + count]
            limit = min(length, prefix_lens[b + count])
            same = prev[:limit] == nxt[:limit]
            common = limit if bool(same.all()) else int(torch.argmin(same.to(torch.uint8)))
            if common < MIN_SHARED:
                break
            length = common
            count += 1
        if count > 1:
            groups.append(SharedGroup(b, count, length))
        b += count
    return groups


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch's fused CPU flash attention on [1, H, L, D] tensors: output [1, H, Lq, D] and the
    log-sum-exp of each query's scores, [1, H, Lq]."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=mask, scale=scale)[:2]
    return out, lse


def _fold(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[T, Hq, D] -> [1, Hkv, G * T, D]: query head j = h * G + g reads KV head h, so the G
    heads of a KV head become rows (g-major) of one attention problem."""
    t, hq, d = q.shape
    g = hq // hkv
    return q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * t, d)


def _unfold(o: torch.Tensor, t: int) -> torch.Tensor:
    """[1, Hkv, G * T, D] (or [1, Hkv, G * T] for a log-sum-exp) back to [T, Hq(, D)]."""
    hkv = o.shape[1]
    if o.dim() == 3:
        return o.view(hkv, -1, t).permute(2, 0, 1).reshape(t, -1)
    d = o.shape[-1]
    return o.view(hkv, -1, t, d).permute(2, 0, 1, 3).reshape(t, -1, d)


def group_attention(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                    slot_rows: list[torch.Tensor], prefix_lens: list[int],
                    extend_lens: list[int], group: SharedGroup, scale: float) -> torch.Tensor:
    """Attention of one group's new tokens: ``q`` [T, Hq, D] holds the group's requests'
    tokens concatenated; returns [T, Hq, D]."""
    hkv = k_buffer.shape[1]
    shared = slot_rows[group.first][:group.length]
    k = k_buffer.index_select(0, shared).transpose(0, 1).unsqueeze(0).to(q.dtype)
    v = v_buffer.index_select(0, shared).transpose(0, 1).unsqueeze(0).to(q.dtype)
    t_all = q.shape[0]
    o_shared, lse_shared = _flash(_fold(q, hkv), k, v, scale)
    o_shared, lse_shared = _unfold(o_shared, t_all), _unfold(lse_shared, t_all)  # [T, Hq(, D)]

    # each request's own keys: requests with the same (cached-but-unshared, new) lengths are
    # stacked along the batch dimension, one call per distinct shape
    g = q.shape[1] // hkv
    starts = [0]
    for b in range(group.first, group.first + group.count):
        starts.append(starts[-1] + extend_lens[b])
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(range(group.first, group.first + group.count)):
        shapes.setdefault((prefix_lens[b] - group.length, extend_lens[b]), []).append(i)
    o_own = torch.empty_like(q)
    lse_own = torch.empty(lse_shared.shape, dtype=lse_shared.dtype)
    for (before, ext), members in shapes.items():
        own = torch.stack([slot_rows[group.first + i][group.length:group.length + before + ext]
                           for i in members]).reshape(-1)
        ko = k_buffer.index_select(0, own).view(len(members), before + ext, hkv, -1)
        vo = v_buffer.index_select(0, own).view(len(members), before + ext, hkv, -1)
        qi = torch.stack([_fold(q[starts[i]:starts[i] + ext], hkv)[0] for i in members])
        # an explicit mask even when before == 0: folded rows are g-major, so the kernel's
        # is_causal (row index against key index) would be wrong for g > 0
        rows = (torch.arange(ext).unsqueeze(1) + before).repeat(g, 1)       # [G * ext, 1]
        visible = torch.arange(before + ext).unsqueeze(0) <= rows
        mask = torch.zeros(visible.shape, dtype=q.dtype).masked_fill(~visible, float("-inf"))
        o, lse = _flash(qi, ko.transpose(1, 2).to(q.dtype), vo.transpose(1, 2).to(q.dtype),
                        scale, mask=mask)
        for n, i in enumerate(members):
            o_own[starts[i]:starts[i] + ext] = _unfold(o[n:n + 1], ext)
            lse_own[starts[i]:starts[i] + ext] = _unfold(lse[n:n + 1], ext)

    top = torch.maximum(lse_shared, lse_own)
    w_shared, w_own = (lse_shared - top).exp(), (lse_own - top).exp()
    out = (o_shared * w_shared.unsqueeze(-1) + o_own * w_own.unsqueeze(-1)) / (
        w_shared + w_own).unsqueeze(-1)
    return out.to(q.dtype)


def extend_attention_shared(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                            req_to_token: torch.Tensor, req_rows: list[int],
                            prefix_lens: list[int], extend_lens: list[int],
                            groups: list[SharedGroup], scale: float) -> torch.Tensor:
    """The reference's ``extend_attention_ref`` with each shared group's prefix read once;
    requests outside a group go through the reference itself."""
    from plait.backends.cpu.attention import extend_attention_ref

    out = torch.empty_like(q)
    starts = [0]
    for ext in extend_lens:
        starts.append(starts[-1] + ext)
    grouped = {b: g for g in groups for b in range(g.first, g.first + g.count)}
    b = 0
    while b < len(req_rows):
        g = grouped.get(b)
        if g is not None:
            members = range(g.first, g.first + g.count)
            rows = [req_to_token[req_rows[i], :prefix_lens[i] + extend_lens[i]].long()
                    for i in members]
            local = SharedGroup(0, g.count, g.length)
            lo, hi = starts[g.first], starts[g.first + g.count]
            out[lo:hi] = group_attention(
                q[lo:hi], k_buffer, v_buffer, rows, [prefix_lens[i] for i in members],
                [extend_lens[i] for i in members], local, scale)
            b += g.count
        else:
            lo, hi = starts[b], starts[b + 1]
            out[lo:hi] = extend_attention_ref(
                q[lo:hi], k_buffer, v_buffer, req_to_token, [req_rows[b]], [prefix_lens[b]],
                [extend_lens[b]], scale)
            b += 1
    return out
