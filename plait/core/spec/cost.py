"""Which drafts pay for themselves in this pass, from pass times measured online.

Why: at batch 1 a decode pass is bound by reading the weights, so verifying a few more tokens
is nearly free and every plausible draft pays. At batch 16 on a CPU the products are already
compute-bound (SmolLM2-135M, one thread: a 16-row decode pass ~80 ms, every row past it
~2.2 ms, and the 17th row ~25 ms, as the product's 8-row tiles gain a latency-bound remainder):
each verified row costs about half a decoded token, and a rejected draft is pure loss. The
right drafts depend on the machine, the batch and each request's acceptance, so they are
measured, not configured.

Rule (:func:`choose_drafts`, for the whole batch at once): plain decoding of ``B`` requests
makes ``B / T(B)`` tokens a second, ``T(B)`` the recent median time of a ``B``-row pass
(:class:`PassCost`; timed at nearly every step); a verify pass over ``B + m`` rows takes the
Theil-Sen line's time through the medians of every size timed (robust: verify sizes are
timed rarely, and one descheduled pass of a rare size must not decide; the line does not
follow a concave curve such as the 17th row's jump, which a batch that drafts pays for). A request whose drafts are each accepted with chance ``a``
given the ones before (:meth:`~plait.core.spec.ngram.DraftState.acceptance`) expects its
``j``-th draft to add ``a ** j`` tokens; the drafts of every request are ranked by that gain
and the rule keeps the top ``m``, with ``m`` maximising the expected tokens a second
``(B + gains) / T(B + m)``, and only when that beats plain decoding by :data:`MARGIN`. So
long drafts go to requests that copy well, and a batch whose acceptance is too low for what a
row costs decodes plainly.

What holds: before two different pass sizes have been timed there is no cap (the proposer's own
limits apply), so the first verify passes measure what speculation costs. The rule only caps;
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
PROBE_EVERY = 16  # steps capped at 0 drafts before a one-draft probe (STANDALONE)


class PassCost:
    """Recent seconds per decode-phase pass, by its row count.

    Each size's estimate is the median of its last :data:`RECENT` times: every size gets the
    same statistic whether it is timed every step (plain decode) or rarely (a verify pass
    of an unusual size), so a descheduled pass shifts no size and none is biased low by
    being timed more often. The line through them is Theil-Sen's (the median of the slopes
    between sizes, then the median intercept), which one slow size cannot tilt."""

    def __init__(self) -> None:
        self._times: OrderedDict[int, deque[float]] = OrderedDict()
        self._fit: tuple[float, float] | None = None
        self._stale = False

    def observe(self, tokens: int, seconds: float) -> None:
        """One decode-phase pass over ``tokens`` rows took ``seconds`` (its forward)."""
        if tokens <= 0 or seconds <= 0:
            return
        times = self._times.pop(tokens, None) or deque(maxlen=RECENT)
        times.append(seconds)
        self._times[tokens] = times
        while len(self._times) > MAX_SIZES:
            self._times.popitem(last=False)
        self._stale = True

    def _refresh(self) -> None:
        if self._stale:
            table = sorted((n, _median(list(ts))) for n, ts in self._times.items())
            self._fit, self._stale = _theil_sen(table), False

    def fit(self) -> tuple[float, float] | None:
        """``(fixed, per_row)`` seconds, both >= 0; None before two sizes were timed."""
        self._refresh()
        return self._fit

    def at(self, tokens: int) -> float | None:
        """Seconds a pass over ``tokens`` rows takes: its size's recent median where timed,
        else the fitted line's; None without a fit."""
        fit = self.fit()
        if fit is None:
            return None
        times = self._times.get(tokens)
        return _median(list(times)) if times else fit[0] + fit[1] * tokens

    def line(self, tokens: int) -> float | None:
        """The fitted line's seconds for ``tokens`` rows; None without a fit."""
        fit = self.fit()
        return None if fit is None else fit[0] + fit[1] * tokens


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _theil_sen(pts: list[tuple[int, float]]) -> tuple[float, float] | None:
    if len(pts) < 2:
        return None
    slopes = [(s2 - s1) / (n2 - n1) for i, (n1, s1) in enumerate(pts) for n2, s2 in pts[i + 1 :]]
    slope = max(0.0, _median(slopes))
    return max(0.0, _median([s - slope * n for n, s in pts])), slope


def choose_drafts(cost: PassCost, accepts: list[float], budgets: list[int]) -> list[int]:
    """How many drafts each request of the batch verifies this pass (``accepts[i]``: its
    acceptance, ``budgets[i]``: what its proposer allows), by the module docstring's rule:
    ``0 .. budgets[i]`` each."""
    batch = len(budgets)
    plain = cost.at(batch) if batch else None
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
        seconds = cost.line(batch + m)
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
