"""Admission that bounds queue *time*, not only queue length.

A fixed queue length is the wrong bound under overload: 256 queued sequences wait a few
seconds on a fast model and minutes on a slow one, and every accepted request pays that wait
while throughput falls (clients time out and retry). So besides the hard count limit (running
+ ``max_queued_requests``: 429) the server predicts when a new request would start running and
sheds it at once with 503 and a ``Retry-After`` when that is past ``max_queue_time``.

**The prediction** takes the largest of three estimates, each blind where another sees:

- *Places*: the engine runs ``running_slots`` sequences at once, and a running sequence frees
  its place about one service time (the mean first-output-to-end time of the last
  :data:`RATE_WINDOW` completions) after it started. A new sequence at position ``p`` among
  those not yet running takes the ``p``-th place to free: the ``(p-1) % slots``-th soonest
  running end plus ``(p-1) // slots`` more service times. This is what bounds a batched
  engine: sequences started together end together, so the 17th in line behind a fresh batch
  of 16 waits that batch *and* the next one, which a fluid ``position / rate`` says is only a
  little more than one.
- *Drain rate*: the sequences ahead over the measured finishes per second (the finishes after
  the window's oldest instant over the time from it to the newest: finishes come in bursts,
  and counting the oldest burst as if spread over the span read the rate one burst high).
  It sees an engine that runs fewer than ``running_slots`` at once (KV-bound).
- *Oldest wait*: while a posted sequence without a first output has waited past the bound, a
  request that would queue waits longer still. This needs no estimate, so it catches a
  service time that has just grown (a noisy neighbour, longer prompts).

Without enough recent samples (:data:`MIN_SAMPLES`) an estimate is unknown and counts as 0
(a cold or idle server never sheds on a guess; the oldest-wait rule still applies).

Every rule counts a request's time from its **arrival** (when the HTTP layer first saw it,
:data:`ARRIVAL`), not from when it is posted to the engine: under overload the body read,
JSON parsing and tokenizing take time of their own. The cheapest refusal happens before any of
that: :mod:`plait.server.admission_gate` asks :meth:`AdmissionControl.refusal` for one
sequence as soon as the request head is parsed.

A request that would run at once (the engine under-filled: fewer admitted sequences than
places) is never shed for time: refusing it would idle a place. Nothing else is admitted
below the bound: an earlier rule that always kept one full batch queued let a whole batch
wait behind a whole batch, about two service times past the bound. Throughput does not need
it: at overload, arrivals in the last ``max_queue_time`` before a batch ends refill it (the
bound should be at least a quarter of one service time at 4x).
"""

from __future__ import annotations

import math
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

#: how many recent finishes the drain rate is measured over, and how old they may be: a
#: rate measured across an idle hour would shed the next burst for nothing
RATE_WINDOW = 64
RATE_SECONDS = 30.0
#: finishes needed before the rate is trusted
MIN_SAMPLES = 8
#: the most a Retry-After asks a client to wait, in seconds
MAX_RETRY_AFTER = 60

#: when the current HTTP request arrived (``time.monotonic()``), set by the admission gate for
#: the task that serves it (and the tasks it starts, which copy the context); None outside one
ARRIVAL: ContextVar[float | None] = ContextVar("plait_arrival", default=None)


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why a request is not admitted: HTTP status, message and ``Retry-After`` seconds."""

    status: int
    message: str
    retry_after: int


class AdmissionControl:
    """Counts admitted sequences, tracks which are queued and which run, and decides whether
    ``count`` more may enter.

    ``running_slots``: sequences the engine runs at once (``--max-running-requests``);
    ``max_queued``: sequences that may wait beyond those; ``max_queue_time``: the longest
    predicted wait from arrival to a running place (None: count limit only). ``clock`` is
    injectable for tests. The caller reports each sequence's life: :meth:`enter` (admitted),
    :meth:`posted` (handed to the engine), :meth:`started` (first output), :meth:`ended`,
    :meth:`leave` (its place is free)."""

    def __init__(
        self,
        *,
        running_slots: int,
        max_queued: int,
        max_queue_time: float | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.running_slots = running_slots
        self.max_queued = max_queued
        self.max_queue_time = max_queue_time
        self.clock = clock
        self.admitted = 0
        self._finishes: deque[float] = deque(maxlen=RATE_WINDOW)
        #: first-output-to-end seconds of the last completed sequences
        self._services: deque[float] = deque(maxlen=RATE_WINDOW)
        #: posted sequences still without a first output, by id, in posting order (so the
        #: first is the oldest: a dict keeps insertion order and deletes keep it)
        self._waiting: dict[str, float] = {}
        #: sequences running (a first output came, not ended yet): id -> when it started
        self._running: dict[str, float] = {}

    @property
    def limit(self) -> int:
        return self.running_slots + self.max_queued

    def drain_rate(self) -> float | None:
        """Sequences finished per second over the recent window, None until measured: the
        finishes after the window's oldest instant over the time from it to the newest. The
        oldest instant's finishes only mark where the span starts (counting them read a burst
        of simultaneous finishes as if spread over the span: one burst high), and the span
        ends at the newest finish, not now (between bursts the rate would sag, then jump)."""
        now = self.clock()
        while self._finishes and self._finishes[0] < now - RATE_SECONDS:
            self._finishes.popleft()
        if len(self._finishes) < MIN_SAMPLES:
            return None
        first, last = self._finishes[0], self._finishes[-1]
        after = sum(1 for t in self._finishes if t > first)
        return after / (last - first) if last > first else None

    def service_time(self) -> float | None:
        """Mean seconds from a sequence's first output to its end, None until measured."""
        if len(self._services) < MIN_SAMPLES:
            return None
        return sum(self._services) / len(self._services)

    def predicted_wait(self, count: int) -> float:
        """Seconds until the last of ``count`` more sequences would be running: the larger of
        the places estimate and the drain-rate estimate (0 when they fit now or neither is
        measured)."""
        position = self.admitted - len(self._running) + count  # among those not yet running
        free = self.running_slots - len(self._running)
        if position <= free:
            return 0.0
        waits = [0.0]
        rate = self.drain_rate()
        if rate is not None:
            waits.append((self.admitted + count - self.running_slots) / rate)
        service = self.service_time()
        if service is not None:
            now = self.clock()
            ends = sorted(max(0.0, service - (now - t)) for t in self._running.values())
            places = ([0.0] * max(0, free) + ends)[: self.running_slots]
            turn, index = divmod(position - 1, self.running_slots)
            waits.append(places[index] + turn * service)
        return max(waits)

    def posted(self, rid: str, since: float | None = None) -> None:
        """Sequence ``rid`` was handed to the engine: it waits until its first output. Its
        wait counts from ``since`` (its request's arrival) when given, else from now."""
        self._waiting[rid] = self.clock() if since is None else since

    def started(self, rid: str) -> None:
        """Sequence ``rid`` got an output: from its first, it runs (later calls: no-op)."""
        if self._waiting.pop(rid, None) is not None:
            self._running[rid] = self.clock()

    def ended(self, rid: str, completed: bool = True) -> None:
        """Sequence ``rid`` ended; a ``completed`` one that ran gives a service-time sample
        (an aborted or failed one would read the service time short)."""
        self._waiting.pop(rid, None)
        began = self._running.pop(rid, None)
        if began is not None and completed:
            self._services.append(self.clock() - began)

    def oldest_wait(self) -> float:
        """Seconds the oldest posted sequence without a first output has waited (0: none)."""
        if not self._waiting:
            return 0.0
        return self.clock() - next(iter(self._waiting.values()))

    def refusal(self, count: int, waited: float = 0.0) -> Refusal | None:
        """Why ``count`` more sequences may not enter now, or None when they may. ``waited``:
        seconds their request has already spent since it arrived; it counts against the
        bound like the predicted queue wait."""
        if self.admitted + count > self.limit:
            return Refusal(
                status=429,
                message=f"too many requests in flight ({self.admitted} sequences; the "
                f"limit is {self.limit}); retry later",
                retry_after=1,
            )
        if self.max_queue_time is None or self.admitted + count <= self.running_slots:
            # it runs at once (the engine is under-filled): shedding it would idle a place
            return None
        # it would queue: behind a request already waiting past the bound, it waits longer
        queue = max(self.predicted_wait(count), self.oldest_wait())
        wait = waited + queue
        if wait <= self.max_queue_time:
            return None
        # come back when the queue ahead has drained to the bound
        retry = min(MAX_RETRY_AFTER, max(1, math.ceil(queue - self.max_queue_time)))
        return Refusal(
            status=503,
            message=f"the server is overloaded: this request would wait about {wait:.0f} s "
            f"from its arrival to a running place (the bound is {self.max_queue_time:g} s, "
            f"--max-queue-time); retry after {retry} s",
            retry_after=retry,
        )

    def enter(self, count: int) -> None:
        self.admitted += count

    def leave(self, count: int) -> None:
        """``count`` sequences finished (or failed, or were aborted): places free up."""
        self.admitted -= count
        now = self.clock()
        self._finishes.extend([now] * count)
