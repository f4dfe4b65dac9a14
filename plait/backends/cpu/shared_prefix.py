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

from plait.backends.cpu import cpp_build

#: shortest common prefix worth a shared call (shorter ones gain less than the merge costs);
#: the decode kernel's ``kMinShared``, whose grouping :func:`shared_groups` uses
MIN_SHARED = 128


@dataclass(frozen=True)
class SharedGroup:
    """Requests ``first .. first + count - 1`` of the batch share their first ``length`` slots."""

    first: int
    count: int
    length: int


def shared_groups(slot_rows: list[torch.Tensor], prefix_lens: list[int]) -> list[SharedGroup]:
    """Groups of two or more consecutive requests sharing at least :data:`MIN_SHARED` cached
    slots. ``slot_rows[b]`` holds request b's slots, at least ``prefix_lens[b]`` of them.

    The rule is the decode kernel's (``csrc/src/decode_attention.cpp``'s ``shared_groups``, which
    never shares a request's last slot): a request's cached prefix is its "all but the last"
    when its length is taken as ``prefix + 1``."""
    if sum(p >= MIN_SHARED for p in prefix_lens) < 2:
        return []
    slots = torch.full((len(slot_rows), max(prefix_lens) + 1), -1, dtype=torch.int64)
    for b, (row, p) in enumerate(zip(slot_rows, prefix_lens)):
        slots[b, :p] = row[:p]
    lens = torch.tensor(prefix_lens, dtype=torch.int64) + 1
    kernel = cpp_build.extension().decode_attention
    return [SharedGroup(*g) for g in kernel.shared_groups(slots, lens)]


def _flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch's fused CPU flash attention on [1, H, L, D] tensors: output [1, H, Lq, D] and the
    log-sum-exp of each query's scores, [1, H, Lq]."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=mask, scale=scale
    )[:2]
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


@dataclass(frozen=True)
class _OwnKeys:
    """Members of a group with the same cached-but-unshared (``before``) and new (``ext``)
    lengths: their own keys are attended to in one call, stacked along the batch dimension."""

    members: list[int]  # indices within the group
    slots: torch.Tensor  # their own keys' slots, [len(members) * (before + ext)] int64
    before: int
    ext: int
    mask: torch.Tensor  # [G * ext, before + ext]: 0 where visible, -inf elsewhere


@dataclass(frozen=True)
class _GroupPlan:
    lo: int  # the group's rows of q: lo .. lo + starts[-1]
    starts: list[int]  # member i's rows: lo + starts[i] .. lo + starts[i + 1]
    shared: torch.Tensor  # the shared keys' slots, int64
    own: list[_OwnKeys]


@dataclass(frozen=True)
class SharedExtendPlan:
    """What an extend batch's attention needs that depends on the batch alone (slot indices,
    masks), built once per forward by :func:`plan_shared_extend` and used by every layer."""

    groups: list[_GroupPlan]
    singles: list[tuple[int, int, int]]  # requests outside a group: (batch index, lo, hi)
    req_to_token: torch.Tensor
    req_rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]


def plan_shared_extend(
    req_to_token: torch.Tensor,
    req_rows: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    groups: list[SharedGroup],
    heads_per_kv: int,
) -> SharedExtendPlan:
    """The plan for an extend batch whose :func:`shared_groups` are ``groups``."""
    starts = [0]
    for ext in extend_lens:
        starts.append(starts[-1] + ext)
    grouped = {b for g in groups for b in range(g.first, g.first + g.count)}
    singles = [(b, starts[b], starts[b + 1]) for b in range(len(req_rows)) if b not in grouped]
    plans = []
    for g in groups:
        members = range(g.first, g.first + g.count)
        rows = [
            req_to_token[req_rows[b], : prefix_lens[b] + extend_lens[b]].long() for b in members
        ]
        shapes: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(members):
            shapes.setdefault((prefix_lens[b] - g.length, extend_lens[b]), []).append(i)
        own = []
        for (before, ext), idx in shapes.items():
            slots = torch.cat([rows[i][g.length :] for i in idx])
            # an explicit mask even when before == 0: folded rows are g-major, so the kernel's
            # is_causal (row index against key index) would be wrong for g > 0
            query_pos = (torch.arange(ext).unsqueeze(1) + before).repeat(heads_per_kv, 1)
            visible = torch.arange(before + ext).unsqueeze(0) <= query_pos
            mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
            own.append(_OwnKeys(idx, slots, before, ext, mask))
        plans.append(
            _GroupPlan(
                starts[g.first],
                [s - starts[g.first] for s in starts[g.first : g.first + g.count + 1]],
                rows[0][: g.length],
                own,
            )
        )
    return SharedExtendPlan(plans, singles, req_to_token, req_rows, prefix_lens, extend_lens)


def group_attention(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, plan: _GroupPlan, scale: float
) -> torch.Tensor:
    """Attention of one group's new tokens: ``q`` [T, Hq, D] holds the group's requests'
    tokens concatenated; returns [T, Hq, D]."""
    hkv = k_buffer.shape[1]
    k = k_buffer.index_select(0, plan.shared).transpose(0, 1).unsqueeze(0).to(q.dtype)
    v = v_buffer.index_select(0, plan.shared).transpose(0, 1).unsqueeze(0).to(q.dtype)
    t_all = q.shape[0]
    o_shared, lse_shared = _flash(_fold(q, hkv), k, v, scale)
    o_shared, lse_shared = _unfold(o_shared, t_all), _unfold(lse_shared, t_all)  # [T, Hq(, D)]

    starts = plan.starts
    o_own = torch.empty_like(q)
    lse_own = torch.empty(lse_shared.shape, dtype=lse_shared.dtype)
    for keys in plan.own:
        n, width = len(keys.members), keys.before + keys.ext
        ko = k_buffer.index_select(0, keys.slots).view(n, width, hkv, -1).transpose(1, 2)
        vo = v_buffer.index_select(0, keys.slots).view(n, width, hkv, -1).transpose(1, 2)
        qi = torch.stack([_fold(q[starts[i] : starts[i + 1]], hkv)[0] for i in keys.members])
        o, lse = _flash(qi, ko.to(q.dtype), vo.to(q.dtype), scale, mask=keys.mask.to(q.dtype))
        for j, i in enumerate(keys.members):
            o_own[starts[i] : starts[i + 1]] = _unfold(o[j : j + 1], keys.ext)
            lse_own[starts[i] : starts[i + 1]] = _unfold(lse[j : j + 1], keys.ext)

    top = torch.maximum(lse_shared, lse_own)
    w_shared, w_own = (lse_shared - top).exp(), (lse_own - top).exp()
    out = (o_shared * w_shared.unsqueeze(-1) + o_own * w_own.unsqueeze(-1)) / (
        w_shared + w_own
    ).unsqueeze(-1)
    return out.to(q.dtype)


def extend_attention_shared(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    plan: SharedExtendPlan,
    scale: float,
) -> torch.Tensor:
    """The reference's ``extend_attention_ref`` with each shared group's prefix read once;
    requests outside a group go through the reference itself."""
    from plait.backends.cpu.attention import extend_attention_ref

    out = torch.empty_like(q)
    for g in plan.groups:
        hi = g.lo + g.starts[-1]
        out[g.lo : hi] = group_attention(q[g.lo : hi], k_buffer, v_buffer, g, scale)
    for b, lo, hi in plan.singles:
        out[lo:hi] = extend_attention_ref(
            q[lo:hi],
            k_buffer,
            v_buffer,
            plan.req_to_token,
            [plan.req_rows[b]],
            [plan.prefix_lens[b]],
            [plan.extend_lens[b]],
            scale,
        )
    return out
