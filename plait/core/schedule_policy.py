"""Which waiting requests go first.

``lpm`` (longest prefix match) admits the requests that reuse the most cached KV first, so a
burst of requests sharing a prefix hit the cache while it is warm. ``fcfs`` keeps arrival order.
Both are cache-aware through :class:`InBatchPrefixDedup`: when several waiting requests share a
prefix that is not cached yet, only one of them computes it in this step; the others wait one
step and then find it in the radix tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the frontend imports common_prefix_len without torch
    from plait.core.kv_manager import KVManager
    from plait.core.request import Req

POLICIES = ("lpm", "fcfs")
# lpm needs a tree match per waiting request; past this queue length fall back to fcfs.
LPM_MAX_QUEUE = 128
# A request is deferred when it shares this many more tokens with an admitted one than the cache
# already holds for it (SGLang uses the same threshold).
IN_BATCH_DEDUP_THRESHOLD = 32


def order_waiting(waiting: list[Req], policy: str, kv: KVManager) -> list[Req]:
    if policy not in POLICIES:
        raise ValueError(f"schedule_policy must be one of {POLICIES}, got {policy!r}")
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
        return list(waiting)
    matched = {id(r): kv.match(r).length for r in waiting}
    return sorted(waiting, key=lambda r: -matched[id(r)])  # stable: ties keep arrival order


class InBatchPrefixDedup:
    """Remembers the token lists admitted in this scheduling round."""

    def __init__(self) -> None:
        self.admitted: list[list[int]] = []

    def add(self, ids: list[int]) -> None:
        self.admitted.append(ids)

    def should_defer(self, ids: list[int], cached_len: int) -> bool:
        for other in self.admitted:
            n = common_prefix_len(ids, other)
            if n - cached_len >= IN_BATCH_DEDUP_THRESHOLD:
                return True
        return False


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
