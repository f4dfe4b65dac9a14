"""Which drafts pay for themselves in this pass, from pass times measured online.

Why: at batch 1 a decode pass is bound by reading the weights, so verifying a few more tokens
is nearly free and every plausible draft pays. At batch 16 on a CPU the products are already
compute-bound (SmolLM2-135M, one thread: a 16-row decode pass ~80 ms, every row past it
~2.2 ms, and the 17th row ~25 ms, as the product's 8-row tiles gain a latency-bound remainder):
each verified row costs about half a decoded token, and a rejected draft is pure loss. The
right drafts depend on the machine, the batch and each request's acceptance, so they are
measured, not configured.

Rule (:func:`choose_drafts`, for the whole batch at once): plain decoding of ``B`` requests
makes ``B / T(B)`` tokens a second, ``T(B)`` the recent median time of a plain ``B``-row
decode pass (:class:`PassCost`; timed at nearly every step); a verify pass over ``B + m``
rows takes the time of a Theil-Sen line through the medians of the verify sizes a pass over
this batch can have (``B + 1`` to ``B`` plus every draft the proposers allow): robust, since
verify sizes are timed rarely and one descheduled pass of a rare size must not decide. Only
those sizes: a batch-1 verify pass (weight-bound, a few rows) says nothing about a batch-16
one (compute-bound), and a line through both, or through plain decode passes of smaller
batches, has the wrong slope (on the profiled batch-16 costs, after batch-1 passes were timed,
such a line cut half the drafts that paid). A request whose drafts are each accepted with chance ``a``
given the ones before (:meth:`~plait.core.spec.ngram.DraftState.acceptance`) expects its
``j``-th draft to add ``a ** j`` tokens; the drafts of every request are ranked by that gain
and the rule keeps the top ``m``, with ``m`` maximising the expected tokens a second
``(B + gains) / T(B + m)``, and only when that beats plain decoding by :data:`MARGIN`. So
long drafts go to requests that copy well, and a batch whose acceptance is too low for what a
row costs decodes plainly.

What holds: until a verify pass of a size this batch can have has been timed there is no cap
(the proposer's own limits apply), so the first verify passes measure what speculation
costs. The rule only caps;
it never lengthens a draft past what the proposer allowed. Acceptance keeps being measured
while drafts are capped: an unverified NGRAM draft is checked against the token decoding
then commits (``DraftState.shadow``), so a request whose text turns copyable again is seen to
(a STANDALONE draft, which costs a draft-model pass to make, is probed with one draft every
:data:`PROBE_EVERY` capped steps instead, :func:`probe`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

MARGIN = 0.05  # drafting must promise 5% more tokens a second (acceptance is an estimate)
RECENT = 5  # times kept per pass size; its estimate is their median
MAX_SIZES = 64  # pass sizes remembered (least recently timed dropped first)
MIN_SPAN = 8  # rows between two verify sizes for their slope to count (one product tile)
PROBE_EVERY = 16  # steps capped at 0 drafts before a one-draft probe (STANDALONE)


class PassCost:
    """Recent seconds per decode-phase pass, by its row count, plain decode and verify apart.

    Each size's estimate is the median of its last :data:`RECENT` times: every size gets the
    same statistic whether it is timed every step (plain decode) or rarely (a verify pass
    of an unusual size), so a descheduled pass shifts no size and none is biased low by
    being timed more often. A verify pass's time comes from a Theil-Sen line (the median of
    the slopes between sizes, then the median intercept; one slow size cannot tilt it)
    through the verify sizes in the range asked for and the batch's plain decode, from
    pairs at least :data:`MIN_SPAN` rows apart (neighbours' noise over one row is no slope),
    or a tenth of the range where that is less (any pair when none is that far apart). The
    plain pass anchors the line: two verify sizes close together (the first, uncapped
    passes) alone gave a slope four times the true one from one slow pass, which then cut
    every draft, so no other size was timed."""

    def __init__(self) -> None:
        self._plain: OrderedDict[int, deque[float]] = OrderedDict()
        self._verify: OrderedDict[int, deque[float]] = OrderedDict()
        self._fits: dict[tuple[int, int], tuple[float, float] | None] = {}

    def observe(self, tokens: int, seconds: float, *, verify: bool = False) -> None:
        """One decode-phase pass over ``tokens`` rows took ``seconds`` (its forward);
        ``verify``: a verify pass, else a plain decode step."""
        if tokens <= 0 or seconds <= 0:
            return
        table = self._verify if verify else self._plain
        times = table.pop(tokens, None) or deque(maxlen=RECENT)
        times.append(seconds)
        table[tokens] = times
        while len(table) > MAX_SIZES:
            table.popitem(last=False)
        self._fits.clear()

    def plain(self, batch: int) -> float | None:
        """A plain decode pass's recent median over ``batch`` rows; None if not timed."""
        times = self._plain.get(batch)
        return _median(list(times)) if times else None

    def fit(self, batch: int = 0, top: int | None = None) -> tuple[float, float] | None:
        """``(fixed, per_row)`` seconds, both >= 0, of a verify pass over ``batch`` requests
        and ``batch + 1`` to ``top`` rows (default: any size), from the verify sizes in that
        range; None when no two sizes (the batch's plain decode counting) were timed."""
        key = (batch, top if top is not None else 1 << 30)
        if key not in self._fits:
            self._fits[key] = self._line_through(batch, key[1])
        return self._fits[key]

    def _line_through(self, batch: int, top: int) -> tuple[float, float] | None:
        pts = [(n, _median(list(ts))) for n, ts in self._verify.items() if batch < n <= top]
        if not pts:
            return None
        plain = self.plain(batch)
        pts = sorted(pts + ([(batch, plain)] if plain is not None else []))
        span = min(MIN_SPAN, max(1, (top - batch) // 10))
        return _theil_sen(pts, span) or _theil_sen(pts)

    def line(self, tokens: int, batch: int = 0, top: int | None = None) -> float | None:
        """The verify line's seconds for ``tokens`` rows (see :meth:`fit`); None without
        a fit."""
        fit = self.fit(batch, top)
        return None if fit is None else fit[0] + fit[1] * tokens


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _theil_sen(pts: list[tuple[int, float]], span: int = 1) -> tuple[float, float] | None:
    """Theil-Sen's line through ``pts`` (sorted by size) from pairs ``span`` or more rows
    apart; None without such a pair."""
    slopes = [
        (s2 - s1) / (n2 - n1)
        for i, (n1, s1) in enumerate(pts)
        for n2, s2 in pts[i + 1 :]
        if n2 - n1 >= span
    ]
    if not slopes:
        return None
    slope = max(0.0, _median(slopes))
    return max(0.0, _median([s - slope * n for n, s in pts])), slope


def choose_drafts(cost: PassCost, accepts: list[float], budgets: list[int]) -> list[int]:
    """How many drafts each request of the batch verifies this pass (``accepts[i]``: its
    acceptance, ``budgets[i]``: what its proposer allows), by the module docstring's rule:
    ``0 .. budgets[i]`` each."""
    batch = len(budgets)
    top = batch + sum(budgets)
    if not batch or cost.fit(batch, top) is None:
        return list(budgets)
    plain = cost.plain(batch) or cost.line(batch, batch, top)
    if plain is None or plain <= 0:
        return list(budgets)
    gains: list[tuple[float, int]] = []
    for i, (a, k) in enumerate(zip(accepts, budgets)):
        p = 1.0
        for _ in range(k):
            p *= a
            gains.append((p, i))
    gains.sort(key=lambda g: -g[0])  # stable: each request's drafts stay in order
    best_m, best = 0, batch / plain * (1 + MARGIN)
    tokens = float(batch)
    for m, (gain, _) in enumerate(gains, 1):
        tokens += gain
        seconds = cost.line(batch + m, batch, top)
        if seconds is not None and seconds > 0 and tokens / seconds > best:
            best_m, best = m, tokens / seconds
    caps = [0] * batch
    for _, i in gains[:best_m]:
        caps[i] += 1
    return caps


def probe(cap: int, state: Any) -> int:
    """``cap``, except that the :data:`PROBE_EVERY`-th zero in a row for ``state`` (a
    :class:`~plait.core.spec.ngram.DraftState`) becomes a one-draft probe."""
    if cap > 0:
        state.capped = 0
        return cap
    state.capped += 1
    if state.capped < PROBE_EVERY:
        return 0
    state.capped = 0
    return 1
