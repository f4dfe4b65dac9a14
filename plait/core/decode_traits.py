"""What the per-step host path needs to know about a request, worked out once (issue 41).

A decode step touches every running request twice (planning its row, applying its token).
Re-deriving the same facts from its sampling parameters each time (is it plain greedy, does
sampling read processed state, when does length end it, which tokens stop it) was most of the
host time per step at batch 256. :func:`traits_of` computes them on the request's first step and
caches them on ``Req.traits``; everything they are built from is fixed for the request's life
(its sampling parameters, prompt, grammar, logprob and stream flags, the context length and
the EOS ids).

``simple`` marks the requests whose token can be applied on the fast path
(``OutputProcessor``): append it, and finish on a stop token or length; no grammar, stop
strings, streaming, logprobs or ``min_new_tokens``. Their text is detokenized once, when they
finish.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.core.request import Req
from plait.core.sampler import takes_plain_argmax


@dataclass(frozen=True, kw_only=True)
class Traits:
    #: every token is the argmax of the raw logits (``takes_plain_argmax``)
    plain_argmax: bool
    #: sampling reads state processing the previous batch may change (grammar, penalties,
    #: ``min_new_tokens``): the executor waits for that processing first
    needs_state: bool
    #: the output length at which the request ends by length (``max_new_tokens`` or the
    #: context length, whichever comes first)
    limit: int
    #: tokens that end it (EOS unless ``ignore_eos``, and ``stop_token_ids``); only
    #: meaningful when ``simple``
    stop_ids: frozenset[int]
    #: its tokens take the fast path (see the module docstring)
    simple: bool


def traits_of(req: Req, context_len: int, eos_ids: set[int]) -> Traits:
    """``req``'s traits, computed on first use and cached on it."""
    traits = req.traits
    if traits is None:
        traits = req.traits = _compute(req, context_len, eos_ids)
    return traits


def _compute(req: Req, context_len: int, eos_ids: set[int]) -> Traits:
    sp = req.sampling
    needs_state = (
        req.grammar is not None
        or bool(sp.frequency_penalty or sp.presence_penalty)
        or sp.repetition_penalty != 1.0
        or sp.min_new_tokens > 0
    )
    stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else frozenset(eos_ids))
    simple = (
        req.grammar is None
        and not sp.stop
        and not req.stream
        and not req.return_logprob
        and sp.min_new_tokens == 0
    )
    return Traits(
        plain_argmax=takes_plain_argmax(req),
        needs_state=needs_state,
        limit=min(sp.max_new_tokens, context_len - len(req.input_ids)),
        stop_ids=stop_ids,
        simple=simple,
    )


@dataclass(frozen=True, kw_only=True)
class BatchTraits:
    """What a decode step needs to know about its whole set of requests: every one
    ``plain_argmax``, any ``needs_state``, every one ``simple``."""

    plain_argmax: bool
    needs_state: bool
    simple: bool


class BatchTraitsCache:
    """The :class:`BatchTraits` of the last request set asked about. Consecutive decode steps
    mostly decode the same requests in the same order, and a list comparison of the same
    objects is one C loop of identity checks, so a step pays a pass over its requests' traits
    only when the set changed."""

    def __init__(self, context_len: int, eos_ids: set[int]):
        self.context_len = context_len
        self.eos_ids = eos_ids
        self._reqs: list[Req] = []
        self._traits = BatchTraits(plain_argmax=True, needs_state=False, simple=True)

    def of(self, reqs: list[Req]) -> BatchTraits:
        if reqs != self._reqs:
            ctx, eos = self.context_len, self.eos_ids
            each = [r.traits or traits_of(r, ctx, eos) for r in reqs]
            self._reqs = list(reqs)
            self._traits = BatchTraits(
                plain_argmax=all(t.plain_argmax for t in each),
                needs_state=any(t.needs_state for t in each),
                simple=all(t.simple for t in each),
            )
        return self._traits
