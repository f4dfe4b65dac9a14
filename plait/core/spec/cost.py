"""How many drafts pay for themselves at this batch size, from pass times measured online.

Why: at batch 1 a decode pass is bound by reading the weights, so verifying a few more tokens
is nearly free and every plausible draft pays. At batch 16 on a CPU the products are already
compute-bound: each verified token costs about as much as a decoded one, and a draft the model
rejects is pure loss. The right draft length depends on the machine and the batch, so it is
measured, not configured.

Model: a decode-phase pass (a plain decode or a verify pass) over ``n`` tokens takes about
``fixed + n * per_token`` seconds (:class:`PassCost`, a robust line through the recent time
of each ``n`` seen). With ``B`` requests running, a token produced by plain decoding costs
``t(B) / B``: the recent time of a pass over ``B`` tokens where one was timed (the line is
not exact at every size: a tiny model's passes are flat at small ``n``), else the line's.
Adding the ``j``-th draft to a request's proposal costs
``per_token`` and saves, in expectation, ``a ** j`` such tokens, where ``a`` is the chance
that one of the request's drafts is accepted given the ones before it were
(:meth:`~plait.core.spec.ngram.DraftState.acceptance`). :func:`draft_cap` keeps the drafts
whose expected saving exceeds their cost by :data:`MARGIN`; so at low acceptance and a
compute-bound batch the cap is 0 and the request decodes plainly in that pass. A request
capped at 0 for :data:`PROBE_EVERY` steps in a row gets one draft (:func:`probe`), so its
acceptance estimate can recover when its text turns copyable (a probe costs one row).

What holds: before two different pass sizes have been timed there is no fit and no cap (the
proposer's own limits apply), so the first verify passes measure what speculation costs. The
fit only caps; it never lengthens a draft past what the proposer allowed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

MARGIN = 0.1  # a draft must save 10% more than it costs (the acceptance estimate is noisy)
RISE = 0.1  # how far a slower pass moves its size's time towards itself
MAX_SIZES = 64  # pass sizes remembered (least recently timed dropped first)
PROBE_EVERY = 16  # steps capped at 0 drafts before a one-draft probe


class PassCost:
    """Recent seconds per decode-phase pass, by its token count; fits ``fixed + n * per_token``.

    Robust to a shared machine: a size's time falls at once to a faster pass and rises only
    slowly (:data:`RISE`; being descheduled only ever adds time), and the line is Theil-Sen's
    (the median of the slopes between sizes, then the median intercept), which one slow size
    cannot tilt."""

    def __init__(self) -> None:
        self._sizes: OrderedDict[int, float] = OrderedDict()  # n -> seconds
        self._fit: tuple[float, float] | None = None
        self._stale = False

    def observe(self, tokens: int, seconds: float) -> None:
        """One decode-phase pass over ``tokens`` tokens took ``seconds`` (its forward)."""
        if tokens <= 0 or seconds <= 0:
            return
        est = self._sizes.pop(tokens, seconds)
        self._sizes[tokens] = seconds if seconds < est else est + RISE * (seconds - est)
        while len(self._sizes) > MAX_SIZES:
            self._sizes.popitem(last=False)
        self._stale = True

    def fit(self) -> tuple[float, float] | None:
        """``(fixed, per_token)`` seconds, both >= 0; None before two sizes were timed."""
        if self._stale:
            self._fit, self._stale = _theil_sen(list(self._sizes.items())), False
        return self._fit

    def at(self, tokens: int) -> float | None:
        """Seconds a pass over ``tokens`` takes: its own recent time where that size was
        timed, else the fitted line's; None without a fit."""
        fit = self.fit()
        if tokens in self._sizes:
            return self._sizes[tokens]
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


def draft_cap(cost: PassCost, accept: float, batch: int, max_drafts: int) -> int:
    """Drafts worth verifying for a request whose drafts are accepted with chance ``accept``
    each (given the earlier ones were), with ``batch`` requests running: 0 .. ``max_drafts``."""
    fit = cost.fit()
    if fit is None or fit[1] <= 0:
        return max_drafts
    per_token, batch = fit[1], max(batch, 1)
    saved_per_token = cost.at(batch) / batch  # type: ignore[operator]  # a decode's, per token
    k, p = 0, accept
    while k < max_drafts and p * saved_per_token > per_token * (1 + MARGIN):
        k += 1
        p *= accept
    return k


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
