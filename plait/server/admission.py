"""Admission that bounds queue *time*, not only queue length.

A fixed queue length is the wrong bound under overload: 256 queued sequences wait a few
seconds on a fast model and minutes on a slow one, and every accepted request pays that wait
while throughput falls (clients time out and retry). So besides the hard count limit (running
+ ``max_queued_requests``: 429) the server predicts how long a new request would wait before a
running place frees: the sequences queued ahead of it over the measured drain rate (sequences
finished per second over the last :data:`RATE_WINDOW` finishes of the last
:data:`RATE_SECONDS`). A request whose predicted
wait exceeds ``max_queue_time`` is shed at once with 503 and a ``Retry-After`` of how long
until the queue is short enough again, so the requests that are accepted keep a latency bound
and the engine keeps its batch full.

With fewer than :data:`MIN_SAMPLES` recent finishes the rate is unknown and only the count
limit applies (a cold or idle server never sheds on a guess).

The rate lags: it is measured over past finishes, so when the service rate falls (a noisy
neighbour, longer prompts) the prediction stays optimistic for up to a window. A second rule
needs no rate: the server also tracks when each admitted sequence was posted and when its
first output came back; while the oldest sequence still without one has waited past
``max_queue_time``, a request that would queue is shed too. Accepted latency then stays
bounded within one request's wait, whatever the rate estimate says.

Both rules count a request's time from its **arrival** (when the HTTP layer first saw it,
:data:`ARRIVAL`), not from when it is posted to the engine: under overload the body read,
JSON parsing and tokenizing take time of their own, and a request that has already spent its
bound there must not be admitted as if it had just come. The cheapest refusal happens before
any of that: :mod:`plait.server.admission_gate` asks :meth:`AdmissionControl.refusal` for one
sequence as soon as the request head is parsed.

The queue is never shed below one batch: while no more than ``running_slots`` sequences
would be queued, the time rules do not apply. Requests of one length started together end
together, so a whole batch's places can free at once; without a batch's worth already queued
they would stay empty until new arrivals trickle in, and throughput would fall under exactly
the overload the shedding is for. The bound therefore holds when it is longer than one
batch's service time; below that, accepted requests wait up to about one service time.
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
    """Counts admitted sequences and decides whether ``count`` more may enter.

    ``running_slots``: sequences the engine runs at once (``--max-running-requests``);
    ``max_queued``: sequences that may wait beyond those; ``max_queue_time``: the longest
    predicted wait a new request may face (None: count limit only); ``min_queued``: the
    queue depth below which the time rules never shed (default ``running_slots``: one batch
    to refill from). ``clock`` is injectable for tests."""

    def __init__(
        self,
        *,
        running_slots: int,
        max_queued: int,
        max_queue_time: float | None,
        min_queued: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.running_slots = running_slots
        self.min_queued = running_slots if min_queued is None else min_queued
        self.max_queued = max_queued
        self.max_queue_time = max_queue_time
        self.clock = clock
        self.admitted = 0
        self._finishes: deque[float] = deque(maxlen=RATE_WINDOW)
        #: posted sequences still without a first output, by id, in posting order (so the
        #: first is the oldest: a dict keeps insertion order and deletes keep it)
        self._waiting: dict[str, float] = {}

    @property
    def limit(self) -> int:
        return self.running_slots + self.max_queued

    def drain_rate(self) -> float | None:
        """Sequences finished per second over the recent window, None until measured."""
        now = self.clock()
        while self._finishes and self._finishes[0] < now - RATE_SECONDS:
            self._finishes.popleft()
        if len(self._finishes) < MIN_SAMPLES:
            return None
        span = now - self._finishes[0]
        return (len(self._finishes) - 1) / span if span > 0 else None

    def predicted_wait(self, count: int) -> float:
        """Seconds until ``count`` more sequences would all be running (0 when they fit now
        or the rate is unknown)."""
        ahead = self.admitted + count - self.running_slots
        rate = self.drain_rate()
        if ahead <= 0 or rate is None:
            return 0.0
        return ahead / rate

    def posted(self, rid: str, since: float | None = None) -> None:
        """Sequence ``rid`` was handed to the engine: it waits until its first output. Its
        wait counts from ``since`` (its request's arrival) when given, else from now."""
        self._waiting[rid] = self.clock() if since is None else since

    def started(self, rid: str) -> None:
        """Sequence ``rid`` got its first output (or ended): it no longer waits."""
        self._waiting.pop(rid, None)

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
        queued = self.admitted + count - self.running_slots
        if self.max_queue_time is None or queued <= self.min_queued:
            # it runs at once, or the queue is not yet one batch deep: shedding it would
            # leave places idle when the running batch ends
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
