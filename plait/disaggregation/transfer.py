"""Moving bytes from this process's registered memory into a peer's: the one interface every
KV transport implements (Mooncake today; NIXL or raw RDMA would be another subclass).

Contract:
- ``register(ptr, nbytes)`` before any address in that range is a source or a destination.
- ``session_id`` is what a peer passes to ``write`` to reach this process's memory.
- ``write(peer, src, dst, lengths)`` copies ``lengths[i]`` bytes from local ``src[i]`` to the
  peer's ``dst[i]`` and returns only when all of it has landed; any failure (peer gone, bad
  address) raises :class:`TransferError` and may have written part of it.
Completion is signalled separately (``plait.disaggregation.bootstrap``), after ``write``
returns, so a transport needs no notification mechanism of its own.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from abc import ABC, abstractmethod


class TransferError(RuntimeError):
    """A write did not complete; the message says why."""


class KVTransfer(ABC):
    session_id: str

    @abstractmethod
    def register(self, ptr: int, nbytes: int) -> None: ...

    @abstractmethod
    def write(self, peer: str, src: list[int], dst: list[int], lengths: list[int]) -> None: ...


def contiguous_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Pair source and destination slot lists into ``(src_start, dst_start, count)`` runs where
    both sides are consecutive, so a fresh pool's mostly contiguous slots move in few writes."""
    if len(src) != len(dst):
        raise ValueError(f"dst has {len(dst)} slots for {len(src)} source slots")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class FakeTransfer(KVTransfer):
    """In-process transport for unit tests: every instance lives in this process, so a write is
    a ``memmove`` after checking both ranges were registered. ``fail_next`` makes the next
    writes raise, to test failure handling."""

    _peers: dict[str, "FakeTransfer"] = {}
    _ids = itertools.count()
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.session_id = f"fake:{next(self._ids)}"
        self.regions: list[tuple[int, int]] = []
        self.fail_next = 0
        with self._lock:
            self._peers[self.session_id] = self

    def register(self, ptr: int, nbytes: int) -> None:
        self.regions.append((ptr, nbytes))

    def _check(self, ptr: int, n: int, who: str) -> None:
        if not any(p <= ptr and ptr + n <= p + size for p, size in self.regions):
            raise TransferError(f"{who} range {ptr:#x}+{n} is not registered")

    def write(self, peer: str, src: list[int], dst: list[int], lengths: list[int]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise TransferError("injected failure")
        target = self._peers.get(peer)
        if target is None:
            raise TransferError(f"no such peer {peer!r}")
        for s, d, n in zip(src, dst, lengths):
            self._check(s, n, "source")
            target._check(d, n, "destination")
            ctypes.memmove(d, s, n)
