"""Where every request the scheduler holds is: one table, four places.

- ``waiting``: queued for an extend, in admission order. Most hold no KV; a retracted request
  holds none either, but one with jump-forward tokens to extend keeps its row (``req_pool_idx``
  set) until it is extended or ``release_pending_jumps`` retracts it.
- ``running``: admitted and decoding, one KV row each. Under the overlap schedule a request
  enters ``running`` when its last extend is planned, before that batch is processed.
- ``chunked``: at most one half-prefilled prompt; it holds KV for the chunks done so far.
- ``inflight``: launched batches not processed yet, oldest first. Their requests are usually
  also in one of the places above; the exception is a prompt in its last extend that samples
  nothing (``max_new_tokens=0``), which lives only here until processing finishes it.

A request is in at most one of ``waiting``, ``running`` and ``chunked``. Only the scheduler
thread reads or writes the table. It moves requests; it never touches their KV.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from plait.core.batch_executor import PlannedBatch
from plait.core.request import Req


class ReqTable:
    def __init__(self) -> None:
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked: Req | None = None
        self.inflight: deque[tuple[PlannedBatch, Future]] = deque()

    def __iter__(self) -> Iterator[Req]:
        """Every request held, the queued ones first; one in flight may appear twice."""
        yield from self.waiting
        yield from self.running
        if self.chunked is not None:
            yield self.chunked
        for plan, _ in self.inflight:
            yield from plan.reqs

    def find(self, rid: str) -> Req | None:
        """The unfinished request ``rid``, wherever it is."""
        return self.find_where(lambda r: r.rid == rid)

    def find_where(self, pred: Callable[[Req], bool]) -> Req | None:
        return next((r for r in self if not r.finished and pred(r)), None)

    def remove(self, req: Req) -> None:
        """Take ``req`` out of ``waiting``, ``running`` or ``chunked``, wherever it is. A batch
        in flight keeps it: processing skips a finished request."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        if req is self.chunked:
            self.chunked = None

    def remove_all(self, reqs: list[Req]) -> None:
        """:meth:`remove` for each of ``reqs``, in one pass over each place: the requests a
        step finished, without two scans of ``running`` per request (issue 41)."""
        gone = set(reqs)
        self.running[:] = [r for r in self.running if r not in gone]
        if self.waiting:
            self.waiting[:] = [r for r in self.waiting if r not in gone]
        if self.chunked in gone:
            self.chunked = None

    def requeue(self, req: Req) -> None:
        """Put ``req`` at the head of the queue (retracted, or jump-forward tokens to
        extend): it goes before requests that never ran."""
        self.remove(req)
        self.waiting.insert(0, req)

    def holds_requests(self) -> bool:
        """Some request is queued, running or half-prefilled."""
        return bool(self.waiting or self.running or self.chunked)

    def has_work(self) -> bool:
        return self.holds_requests() or bool(self.inflight)
