"""Where every KV slot is: the request-to-token pool, the slot allocator and the prefix cache
behind one object, so the scheduler asks for slots and gives them back without doing any
cache bookkeeping itself.

Ownership of the slots in a request's row ``req_to_token[req.req_pool_idx]``::

    region                  owner          valid when
    ----------------------  -------------  ------------------------------------------------------
    [0, cache_len)          prefix cache   from admission (the matched prefix) and after every
                                           cache_unfinished; locked through ``req.last_node``
    [cache_len, kv_len)     the request    computed but not in the cache: tokens decoded since
                                           the last cache_unfinished, a partial tail page, or
                                           everything when the cache is the NullPrefixCache
    [kv_len, kv_len + n)    the request    slots from alloc_extend / alloc_decode for the
                                           forward in flight (the model runner writes them into
                                           the row); the scheduler moves kv_len past them after
    free pages              the allocator  never in a row that a running request reads

Transitions (all in this module):

- ``admit``: a free row; the matched prefix is locked and copied in; ``kv_len = cache_len``.
- ``cache_unfinished``: ``[0, kv_len)`` is inserted into the cache. Tokens another request
  cached meanwhile are duplicates: the request's copies are freed and the cache's written into
  the row. The lock moves to the node of the new, longer prefix.
- ``admit_for_transfer`` (disaggregated decode): a free row holding the prompt's longest
  cached prefix (``p`` tokens, locked as by ``admit``) and ``n - p`` fresh slots after it,
  ``kv_len = p``: the fresh slots are the request's but hold nothing valid until a prefill
  server has written them. ``transfer_done`` then sets ``kv_len = n`` and caches the prompt
  (an ordinary admitted request from there on); ``transfer_failed`` frees the fresh slots and
  the row, caching nothing new.
- ``release``: ``cache_unfinished``, unlock, free ``[cache_len, kv_len)``, free the row (a slot
  whose token is still in flight, under the overlap schedule, is freed, never cached). Used
  for finish, abort and retraction alike: a retracted request's computed KV stays in the cache,
  so resuming it is mostly a cache hit.

- ``concat_and_append`` (``join(mode="concate_and_append")``): branches forked from one
  prefix, all cached, become one cached sequence, the prefix then every branch's own tokens
  in order. The first branch's slots are the tree's already; the others' KV is copied into
  fresh slots (no forward), which the tree then owns. Nothing is admitted or locked after.

Invariant: every allocatable slot is in exactly one of the allocator's free list, the cache,
or some admitted request's ``[cache_len, kv_len)`` (plus the in-flight slots of one step).
With no request admitted, free plus cached is ``num_slots`` and all of the cache is
evictable; after ``flush`` every slot is free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.radix_cache import RadixCache
from plait.core.request import Req


class PrefixCache(Protocol):
    """What the KVManager needs of a prefix cache (:class:`RadixCache` is the real one).

    ``insert`` hands the cache the slots of the tokens it did not hold; afterwards
    ``match_prefix`` of the same key returns exactly the slots the cache owns for it, which is
    how the KVManager learns what it gave away. Lock handles are opaque. ``namespace``
    (``Req.cache_namespace``: a LoRA adapter's uid, None for the base model) separates
    prefixes: a key cached in one namespace never matches in another.
    """

    def match_prefix(self, key: list[int], namespace: Any = None) -> tuple[torch.Tensor, Any]: ...
    def insert(self, key: list[int], value: torch.Tensor, namespace: Any = None) -> int: ...
    def inc_lock_ref(self, handle: Any) -> None: ...
    def dec_lock_ref(self, handle: Any) -> None: ...
    def evict(self, num_tokens: int) -> int: ...
    def evictable_size(self) -> int: ...
    def total_size(self) -> int: ...
    def reset(self) -> None: ...


class NullPrefixCache:
    """The cache used with ``disable_radix_cache``: it holds nothing, so every match is empty,
    ``insert`` takes no slots (the request keeps and later frees all of them) and there is
    nothing to evict."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def match_prefix(self, key: list[int], namespace: Any = None) -> tuple[torch.Tensor, None]:
        return torch.empty(0, dtype=torch.int64, device=self.device), None

    def insert(self, key: list[int], value: torch.Tensor, namespace: Any = None) -> int:
        return 0

    def inc_lock_ref(self, handle: None) -> None:
        pass

    def dec_lock_ref(self, handle: None) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass


@dataclass
class PrefixMatch:
    """Cached slots for the start of a request's tokens, and the handle that locks them."""

    slots: torch.Tensor
    handle: Any

    @property
    def length(self) -> int:
        return len(self.slots)


@dataclass
class KVUsage:
    """Token counts for admission, metrics and ``get_server_info``."""

    num_slots: int  # allocatable slots in all
    free: int  # in the allocator's free list
    cached: int  # held by the prefix cache, locked or not
    evictable: int  # held by the cache and unlocked: free after an eviction


class KVManager:
    """The one owner of KV bookkeeping (see the module docstring for who owns which slots).

    Calls come from the scheduler thread only; ``req`` arguments are admitted requests
    (``req.req_pool_idx`` set) except for ``match``, ``admit`` and ``release``.
    """

    def __init__(self, req_pool: ReqToTokenPool, allocator: TokenSlotAllocator, cache: PrefixCache):
        self.req_pool = req_pool
        self.allocator = allocator
        self.cache = cache
        self.page_size = allocator.page_size
        self.num_slots = allocator.num_slots
        #: called with every request released (a draft model frees its own KV for it)
        self.on_release: list[Callable[[Req], None]] = []

    @classmethod
    def create(
        cls, req_pool: ReqToTokenPool, allocator: TokenSlotAllocator, enable_cache: bool = True
    ) -> "KVManager":
        cache = (
            RadixCache(allocator, allocator.page_size)
            if enable_cache
            else NullPrefixCache(allocator.device)
        )
        return cls(req_pool, allocator, cache)

    # ----- admission -----

    def match(self, req: Req) -> PrefixMatch:
        """The longest cached prefix ``req`` may reuse (see ``Req.max_prefix_len``). Nothing is
        locked yet: match and ``admit`` with no allocation in between."""
        slots, handle = self.cache.match_prefix(
            req.fill_ids[: req.max_prefix_len()], req.cache_namespace
        )
        return PrefixMatch(slots, handle)

    def admit(self, req: Req, prefix: PrefixMatch) -> bool:
        """Give ``req`` a row holding ``prefix``, locked. False (nothing taken) when every row
        is in use."""
        row = self.req_pool.alloc()
        if row is None:
            return False
        self.cache.inc_lock_ref(prefix.handle)
        p = prefix.length
        self.req_pool.req_to_token[row, :p] = prefix.slots.to(torch.int32)
        req.req_pool_idx, req.last_node = row, prefix.handle
        req.kv_len = req.cache_len = p
        return True

    def admit_for_transfer(self, req: Req, n: int) -> tuple[torch.Tensor, int] | None:
        """A row for a prompt of ``n`` tokens whose KV another server computes: its longest
        cached prefix (``p`` tokens, at most ``n - 1``, so at least one token's KV comes from
        the prefill side) is reused and locked, and ``n - p`` fresh slots after it are for the
        transfer to write. Returns (the fresh slots, ``p``); None, taking nothing, when a row
        or the slots are short after evicting."""
        slots, handle = self.cache.match_prefix(req.input_ids[: n - 1], req.cache_namespace)
        if not self.admit(req, PrefixMatch(slots, handle)):
            return None
        p, row = len(slots), req.req_pool_idx
        assert row is not None  # admit gave it
        rest = self._alloc(n - p, self._last_slot(req))
        if rest is None:  # undo admit: unlock, give the row back
            self.cache.dec_lock_ref(handle)
            self.req_pool.free(row)
            req.req_pool_idx = req.last_node = None
            req.kv_len = req.cache_len = 0
            return None
        self.req_pool.req_to_token[row, p:n] = rest.to(torch.int32)
        return rest, p

    def transfer_done(self, req: Req, n: int) -> None:
        """The fresh slots from ``admit_for_transfer`` now hold ``req``'s tokens up to ``n``:
        the prompt goes into the cache at once, so a later request sharing it reuses it."""
        req.kv_len = n
        self.cache_unfinished(req)

    def transfer_failed(self, req: Req, slots: torch.Tensor) -> None:
        """Give back a row and the fresh ``slots`` whose KV never arrived (or may be partial);
        the reused prefix stays cached."""
        self.allocator.free(slots)
        self.release(req)

    # ----- allocation -----

    def alloc_extend(self, req: Req, n: int) -> torch.Tensor | None:
        """Slots for tokens ``kv_len..kv_len+n`` of an admitted ``req``, evicting unlocked
        cache leaves if the free list is short. None, allocating nothing, when even that is not
        enough: the caller queues or retracts."""
        return self._alloc(n, self._last_slot(req))

    def alloc_decode(self, reqs: list[Req]) -> torch.Tensor | None:
        """One slot per request (for token ``kv_len``), all or nothing, evicting as needed."""
        if self.page_size == 1:
            return self._alloc(len(reqs), -1)
        got: list[torch.Tensor] = []
        for req in reqs:
            s = self._alloc(1, self._last_slot(req))
            if s is None:
                # Undo: only slots that opened a fresh page were taken from the free list.
                for g in got:
                    if int(g[0]) % self.page_size == 0:
                        self.allocator.free(g)
                return None
            got.append(s)
        return torch.cat(got)

    def _alloc(self, n: int, last_slot: int) -> torch.Tensor | None:
        slots = self.allocator.alloc(n, last_slot)
        if slots is None and self.cache.evict(n + self.page_size):
            slots = self.allocator.alloc(n, last_slot)
        return slots

    def _last_slot(self, req: Req) -> int:
        if req.kv_len == 0:
            return -1
        return int(self.req_pool.req_to_token[req.req_pool_idx, req.kv_len - 1])

    # ----- giving KV back -----

    def cache_unfinished(self, req: Req) -> None:
        """Insert ``req``'s computed tokens into the cache so other requests can share them
        now; ``req`` keeps running on the cache's copies, locked."""
        row = self.req_pool.req_to_token[req.req_pool_idx]
        # Under the overlap schedule the last slot may hold a token still in flight (not in
        # fill_ids yet): it stays the request's, freed by release.
        n = min(req.kv_len, len(req.fill_ids))
        key = req.fill_ids[:n]
        slots = row[:n].long()
        present = self.cache.insert(key, slots, req.cache_namespace)
        if present > req.cache_len:  # cached by another request since: ours are duplicates
            self.allocator.free(slots[req.cache_len : present])
        new_prefix, handle = self.cache.match_prefix(key, req.cache_namespace)
        row[: len(new_prefix)] = new_prefix.to(row.dtype)
        self.cache.inc_lock_ref(handle)
        self.cache.dec_lock_ref(req.last_node)
        req.last_node = handle
        req.cache_len = len(new_prefix)

    def release(self, req: Req) -> None:
        """Return all of ``req``'s KV (finish, abort or retraction): computed tokens go to the
        cache, the rest is freed, the lock and the row are given back. No-op when ``req``
        holds no row."""
        tail = self._give_back(req)
        if tail is not None and tail.numel():
            self.allocator.free(tail)

    def release_all(self, reqs: list[Req]) -> None:
        """:meth:`release` for each of ``reqs`` (a step's finished requests), their
        uncached slots freed together: one allocator call, not one per request."""
        tails = [t for t in map(self._give_back, reqs) if t is not None and t.numel()]
        if tails:
            self.allocator.free(torch.cat(tails) if len(tails) > 1 else tails[0])

    def _give_back(self, req: Req) -> torch.Tensor | None:
        """Everything :meth:`release` does but freeing: returns the slots to free."""
        for hook in self.on_release:
            hook(req)
        if req.req_pool_idx is None:
            return None
        if req.kv_len > 0:
            self.cache_unfinished(req)
        tail = self.req_pool.req_to_token[req.req_pool_idx, req.cache_len : req.kv_len].long()
        self.cache.dec_lock_ref(req.last_node)
        self.req_pool.free(req.req_pool_idx)
        req.req_pool_idx = req.last_node = None
        req.kv_len = req.cache_len = 0
        return tail

    def concat_and_append(
        self, prefix: list[int], branches: list[list[int]], buffers: list[torch.Tensor]
    ) -> list[int]:
        """Cache ``prefix + branches[0][p:] + branches[1][p:] + ...`` (``p = len(prefix)``),
        reusing the branches' cached KV: each segment keeps the KV its branch computed, at
        the positions it had there (``p`` onwards). ``buffers``: the pool's K and V buffers,
        indexed by slot. Returns the joined token ids. ``ValueError`` when a branch does not
        start with ``prefix`` or is no longer fully cached, or with pages over one token."""
        if self.page_size != 1:
            raise ValueError("concate_and_append over KV needs page_size 1")
        p = len(prefix)
        matches = []
        for i, ids in enumerate(branches):
            if ids[:p] != prefix or len(ids) <= p:
                raise ValueError(f"branch {i} does not extend the parent's {p} tokens")
            slots, handle = self.cache.match_prefix(ids)
            if len(slots) < len(ids):
                raise ValueError(
                    f"branch {i}'s KV is no longer cached ({len(slots)} of {len(ids)} tokens)"
                )
            matches.append((slots, handle))
        for _, handle in matches:  # the sources must survive the eviction alloc may do
            self.cache.inc_lock_ref(handle)
        try:
            joined = list(branches[0]) + [t for ids in branches[1:] for t in ids[p:]]
            head = matches[0][0]
            if len(joined) == len(head):
                return joined
            src = torch.cat([slots[p:] for slots, _ in matches[1:]])
            dst = self._alloc(len(src), -1)
            if dst is None:
                raise ValueError(
                    f"concate_and_append: no room in the KV pool for {len(src)} tokens"
                )
            for buf in buffers:
                buf[dst] = buf[src]
            present = self.cache.insert(joined, torch.cat([head, dst]))
            if present > len(head):  # an identical join is cached already: ours are spares
                self.allocator.free(dst[: present - len(head)])
            return joined
        finally:
            for _, handle in matches:
                self.cache.dec_lock_ref(handle)

    def trim(self, req: Req, n: int) -> None:
        """Give back the slots of ``req``'s tokens ``n..kv_len`` (drafts a verify pass
        rejected; page size 1); ``req`` keeps its first ``n`` tokens' KV."""
        if not req.cache_len <= n <= req.kv_len:
            raise ValueError(f"cannot trim to {n}: cache_len={req.cache_len}, kv_len={req.kv_len}")
        tail = self.req_pool.req_to_token[req.req_pool_idx, n : req.kv_len].long()
        if tail.numel():
            self.allocator.free(tail)
        req.kv_len = n

    def flush(self) -> None:
        """Drop the whole cache. Only while no request is admitted: their locks become void."""
        self.cache.reset()

    # ----- numbers -----

    def free_tokens(self) -> int:
        """Tokens that can be allocated now, counting what eviction would free."""
        return self.allocator.available_size() + self.cache.evictable_size()

    def usage(self) -> KVUsage:
        return KVUsage(
            num_slots=self.num_slots,
            free=self.allocator.available_size(),
            cached=self.cache.total_size(),
            evictable=self.cache.evictable_size(),
        )
