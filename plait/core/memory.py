"""Where a request's tokens live: the request-to-token table and the KV slot allocator.

A running request owns one row of :class:`ReqToTokenPool`; entry ``i`` of that row is the KV
slot (a row of every layer's K/V buffer in :class:`~plait.core.backend_api.KVPool`) of the
request's ``i``-th token. :class:`TokenSlotAllocator` hands those slots out in pages.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Row r holds the KV slot of each token of the request that owns row r.

    Rows are handed out whole; their contents are the caller's to write and are not cleared
    on free.
    """

    def __init__(self, size: int, max_context_len: int, device: torch.device | str = "cpu"):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if max_context_len <= 0:
            raise ValueError(f"max_context_len must be positive, got {max_context_len}")
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32, device=device)
        self.clear()

    def alloc(self) -> int | None:
        """A free row index, or None when every row is taken."""
        if not self._free:
            return None
        idx = self._free.pop()
        self._is_free[idx] = False
        return idx

    def free(self, idx: int) -> None:
        if not 0 <= idx < self.size:
            raise ValueError(f"idx {idx} out of range [0, {self.size})")
        if self._is_free[idx]:
            raise ValueError(f"idx {idx} is already free")
        self._is_free[idx] = True
        self._free.append(idx)

    def available_size(self) -> int:
        return len(self._free)

    def clear(self) -> None:
        # A stack whose top is row 0, so rows come out in ascending order on a fresh pool.
        self._free = list(range(self.size - 1, -1, -1))
        self._is_free = [True] * self.size


class TokenSlotAllocator:
    """Free list of KV slots in page granularity.

    Page 0 (slots ``0..page_size-1``) is reserved for padding and never handed out. Allocatable
    pages are ``1..num_slots // page_size``, so valid slots are
    ``page_size .. num_slots + page_size - 1`` (the KVPool allocates ``num_slots + page_size``
    rows). A page belongs to one request (or to the radix cache) at a time; token ``i`` of a
    request sits at offset ``i % page_size`` of its page.

    Free pages are a tensor used as a stack with a top index, so alloc and free are a slice
    and a slice-assign with no per-token Python work.
    """

    def __init__(self, num_slots: int, page_size: int = 1, device: torch.device | str = "cpu"):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_slots <= 0 or num_slots % page_size:
            raise ValueError(
                f"num_slots must be a positive multiple of page_size={page_size}, got {num_slots}"
            )
        self.num_slots = num_slots
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        self.device = torch.device(device)
        self._offsets = torch.arange(page_size, dtype=torch.int64, device=self.device)
        self.clear()

    def alloc(self, n: int, last_slot: int = -1) -> torch.Tensor | None:
        """Slots (int64, in token order) for ``n`` new tokens of one request.

        ``last_slot`` is the slot of the request's previous token (-1: none). With
        ``page_size > 1`` the new tokens first fill the rest of that token's page, which the
        request already owns, then take fresh pages. Returns None, allocating nothing, when
        there are not enough free pages.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        ps = self.page_size
        head = None
        if ps > 1 and last_slot >= 0 and (last_slot + 1) % ps:
            page = last_slot // ps
            if not 1 <= page <= self.num_pages or bool(self._is_free[page]):
                raise ValueError(f"last_slot {last_slot} is not in an allocated page")
            k = min(ps - (last_slot + 1) % ps, n)
            head = torch.arange(
                last_slot + 1, last_slot + 1 + k, dtype=torch.int64, device=self.device
            )
            n -= k
        num_pages = -(-n // ps)
        if num_pages > self._top:
            return None
        # flip: the stack's top is its end; flip also copies, so callers never see the stack.
        pages = self._stack[self._top - num_pages : self._top].flip(0)
        self._top -= num_pages
        self._is_free[pages] = False
        slots = pages if ps == 1 else (pages[:, None] * ps + self._offsets).flatten()[:n]
        return slots if head is None else torch.cat([head, slots])

    def free(self, slots: torch.Tensor) -> None:
        """Frees the pages covered by ``slots``. Callers only free whole pages they own."""
        if slots.numel() == 0:
            return
        ps = self.page_size
        pages = torch.unique(slots if ps == 1 else slots // ps)  # sorted; duplicates dropped
        lo, hi = int(pages[0]), int(pages[-1])
        if lo < 1 or hi > self.num_pages:
            raise ValueError(
                f"slots cover page {lo if lo < 1 else hi}, outside allocatable "
                f"pages 1..{self.num_pages}"
            )
        if bool(self._is_free[pages].any()):
            raise ValueError("slots cover a page that is already free (double free)")
        self._is_free[pages] = True
        k = pages.numel()
        self._stack[self._top : self._top + k] = pages
        self._top += k

    def available_size(self) -> int:
        """Free tokens: free pages times page_size."""
        return self._top * self.page_size

    def clear(self) -> None:
        # Filled in descending order so a fresh allocator hands out pages 1, 2, 3, ...
        self._stack = torch.arange(self.num_pages, 0, -1, dtype=torch.int64, device=self.device)
        self._top = self.num_pages
        self._is_free = torch.ones(self.num_pages + 1, dtype=torch.bool, device=self.device)
        self._is_free[0] = False  # the padding page is never free to hand out
