"""Which slice of each weight a tensor-parallel rank owns (Megatron-style).

- Query heads are split by whole KV groups, so every rank's GQA group size equals the model's
  and the attention kernels run unchanged on a rank's local heads. With at least as many KV
  heads as ranks, the groups are dealt out in contiguous, balanced runs (3 groups on 2 ranks:
  2 and 1, so SmolLM2's 9/3 heads run on 2 ranks). With fewer KV heads than ranks each KV head
  is replicated on ``tp_size // num_key_value_heads`` ranks, which share its query heads;
  counts that allow neither are refused with a ValueError naming them.
- Everything else (MLP intermediate columns, vocabulary rows) is split into contiguous ranges
  whose sizes differ by at most one: :func:`split_range`.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are split into ``parts`` contiguous
    runs; the first ``n % parts`` runs are one longer."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def split_sizes(n: int, parts: int) -> list[int]:
    return [stop - start for start, stop in (split_range(n, parts, i) for i in range(parts))]


@dataclass(frozen=True, kw_only=True)
class HeadShard:
    """Rank's heads: query heads ``q_start..q_start+num_heads`` and KV heads
    ``kv_start..kv_start+num_kv_heads`` of the full model. Invariant: ``num_heads`` is
    ``num_kv_heads`` times the model's group size, and local query head ``i`` uses local KV
    head ``i // group``, as in the full model."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def shard_heads(num_heads: int, num_kv_heads: int, tp_size: int, rank: int) -> HeadShard:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads={num_heads} is not a multiple of "
            f"num_key_value_heads={num_kv_heads}"
        )
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        kv_start, kv_stop = split_range(num_kv_heads, tp_size, rank)
        return HeadShard(
            q_start=kv_start * group,
            num_heads=(kv_stop - kv_start) * group,
            kv_start=kv_start,
            num_kv_heads=kv_stop - kv_start,
        )
    replicas = tp_size // num_kv_heads
    if tp_size % num_kv_heads or group % replicas:
        raise ValueError(
            f"tp_size={tp_size} cannot split num_attention_heads={num_heads} with "
            f"num_key_value_heads={num_kv_heads}: with fewer KV heads than ranks, tp_size must "
            f"be a multiple of num_key_value_heads and each KV head's {group} query heads must "
            f"split evenly over its {tp_size}/{num_kv_heads} ranks"
        )
    per_rank = group // replicas
    kv = rank // replicas
    return HeadShard(
        q_start=kv * group + (rank % replicas) * per_rank,
        num_heads=per_rank,
        kv_start=kv,
        num_kv_heads=1,
    )


def check_tp_size(num_heads: int, num_kv_heads: int, tp_size: int) -> int:
    """Validate that every rank gets a shard; returns the largest rank's KV head count (what a
    per-rank KV budget is sized by). Raises ValueError naming the head counts."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    return max(
        shard_heads(num_heads, num_kv_heads, tp_size, r).num_kv_heads for r in range(tp_size)
    )
