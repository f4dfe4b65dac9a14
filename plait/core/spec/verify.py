"""Speculative decoding's step: draft, verify in one extend pass, commit what the model agrees
with.

Planning (:meth:`Speculator.plan`): every running request gets a draft (``ngram.py``; under
STANDALONE the draft model's, ``draft_model.py``) cut to what it may still produce
(``max_new_tokens``, the context), to what pays for the batch given each request's acceptance
so far (``cost.py``, from the pass times :meth:`Speculator.observe` records) and to what its grammar
allows, and KV for its last token plus the draft. Requests of different draft lengths go into one
extend batch, ``[last token, d_1 .. d_k]`` each, with logits for every row. When no request
has a draft this step, or KV for the drafts is short, the scheduler decodes as usual (its
retraction ladder handles memory pressure).

Verifying (:meth:`Speculator.apply`): row ``i`` of a request's logits is the model's
distribution after its committed tokens and ``d_1 .. d_i``. Rows are sampled in order by the
ordinary sampler, the request's state (output ids for penalties, the grammar, min tokens)
advanced by each token committed before, and each sampled token is committed; verification
goes on while the sampled token equals the draft. So:

- greedy, the output is the longest draft prefix equal to the argmax plus the argmax after
  it (the bonus token): token for token what decoding without speculation gives;
- sampling, draft ``x`` is kept exactly when the token sampled from ``p`` is ``x``, which
  happens with probability ``p(x)``; otherwise the token was drawn from ``p`` given it is not
  ``x``, i.e. from normalised ``max(p - q, 0)`` for the point-mass draft ``q``: speculative
  (rejection) sampling's rule, with one draw per committed token from the request's
  generator, so a seeded request gives the same tokens with speculation as without.

The verify pass computed KV for the last token and every draft; KV of the tokens after the
last accepted draft is freed at once (``KVManager.trim``). Stop tokens, stop strings and
``max_new_tokens`` end a request in the middle of a draft like anywhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

from plait.core.finish_reason import FinishReason
from plait.core.forward_batch import ExtendItem
from plait.core.kv_manager import KVManager
from plait.core.req_table import ReqTable
from plait.core.request import Req
from plait.core.request_output import RequestFinisher
from plait.core.sampler import sample, takes_plain_argmax, token_logprobs
from plait.core.scheduler_config import SchedulerConfig, SchedulerStats
from plait.core.spec.config import SpecSettings
from plait.core.spec.cost import PassCost, choose_drafts, probe
from plait.core.spec.ngram import DraftState, propose

log = logging.getLogger(__name__)


class Drafter(Protocol):
    """A draft model (STANDALONE): up to ``budgets[i]`` drafts after each request's
    committed tokens, in one batch."""

    def propose(self, reqs: list[Req], budgets: list[int]) -> list[list[int]]: ...


class Speculator:
    """Drafts and verification for the scheduler (see the module docstring)."""

    def __init__(
        self,
        settings: SpecSettings,
        kv: KVManager,
        table: ReqTable,
        stats: SchedulerStats,
        config: SchedulerConfig,
        finisher: RequestFinisher,
        after_append: Callable[[Req], None],
        end: Callable[[Req, FinishReason], None],
    ):
        """``after_append`` does what follows a request's new tokens (finish and release,
        jump-forward, emit); ``end`` fails a request."""
        self.settings = settings
        self.kv = kv
        self.table = table
        self.stats = stats
        self.config = config
        self.finisher = finisher
        self.after_append = after_append
        self.end = end
        #: STANDALONE's draft model (``draft_model.DraftModel``); None: NGRAM drafts
        self.drafter: Drafter | None = None
        self.cost = PassCost()

    # ----- planning -----

    def observe(self, tokens: int, seconds: float, verify: bool) -> None:
        """A decode-phase pass over ``tokens`` rows took ``seconds`` (``verify``: a verify
        pass, else a plain decode step)."""
        self.cost.observe(tokens, seconds, verify=verify)

    def state(self, req: Req) -> DraftState:
        if req.spec is None:
            req.spec = DraftState(budget=self.settings.max_drafts)
        return req.spec

    def budget(self, req: Req) -> int:
        """How many drafts ``req``'s proposer may give this step: its adaptive length within
        ``max_new_tokens`` and the context (what pays is decided for the batch, ``drafts``).
        Call once per step: it counts down a cooldown."""
        state = self.state(req)
        state.check_shadow(req.fill_ids)
        room = min(
            req.sampling.max_new_tokens - len(req.output_ids) - 1,
            self.config.context_len - len(req.fill_ids) - 1,
        )
        return min(state.next_budget(), room)

    def propose(self, req: Req, k: int) -> list[int]:
        """``req``'s NGRAM draft of at most ``k`` tokens, cut to what its grammar allows."""
        if k <= 0:
            return []
        s = self.settings
        drafts = propose(self.state(req), req.fill_ids, self.kv.cache, k, s.min_match, s.max_match)
        if req.grammar is not None:
            drafts = _grammar_prefix(req.grammar, drafts)
        return drafts

    def drafts(self, reqs: list[Req]) -> list[list[int]]:
        """Every request's draft this step, cut to what pays for the batch (``cost.py``):
        NGRAM's, proposed first (an unverified one is remembered to measure acceptance), or
        the draft model's, in one batch after the cut."""
        budgets = [self.budget(r) for r in reqs]
        states = [self.state(r) for r in reqs]
        if self.drafter is None:
            proposed = [self.propose(r, k) for r, k in zip(reqs, budgets)]
            caps = choose_drafts(
                self.cost, [s.acceptance() for s in states], list(map(len, proposed))
            )
            for r, s, d, cap in zip(reqs, states, proposed, caps):
                s.remember(d if cap == 0 else [], len(r.fill_ids))
            return [d[:cap] for d, cap in zip(proposed, caps)]
        caps = choose_drafts(self.cost, [s.acceptance() for s in states], budgets)
        caps = [probe(c, s) if k > 0 else 0 for c, k, s in zip(caps, budgets, states)]
        proposed = self.drafter.propose(reqs, caps)
        return [
            _grammar_prefix(r.grammar, d) if r.grammar is not None and d else d
            for r, d in zip(reqs, proposed)
        ]

    def plan(self, reqs: list[Req]) -> tuple[list[ExtendItem], list[list[int]]] | None:
        """Extend items ``[last token + draft]`` with KV, one per request of ``reqs``, and
        the drafts; None (nothing allocated) when no request drafts or KV is short."""
        drafts = self.drafts(reqs)
        if not any(drafts):
            return None
        items: list[ExtendItem] = []
        for req, d in zip(reqs, drafts):
            n = 1 + len(d)
            slots = self.kv.alloc_extend(req, n)
            if slots is None:
                for it in items:
                    self.kv.allocator.free(it.slots)
                return None
            start = req.kv_len
            items.append(
                ExtendItem(
                    req=req,
                    start=start,
                    length=n,
                    slots=slots,
                    logit_from=start,
                    tokens=[req.fill_ids[start], *d],
                )
            )
        return items, drafts

    # ----- verifying -----

    def apply(self, items: list[ExtendItem], drafts: list[list[int]], logits: Any) -> None:
        """Verify every request's draft against its logits rows and commit the result."""
        if not isinstance(logits, torch.Tensor):
            raise TypeError("a verify pass needs logits, got the model's greedy tokens")
        row = 0
        for it, d in zip(items, drafts):
            rows = logits[row : row + it.length]
            row += it.length
            if it.req.finished:  # aborted meanwhile: its KV is already released
                continue
            self._verify(it, d, rows)

    def _verify(self, it: ExtendItem, draft: list[int], rows: torch.Tensor) -> None:
        req = it.req
        greedy = _plain_argmax(rows) if takes_plain_argmax(req) else None
        committed = 0
        for i in range(len(draft) + 1):
            token = greedy[i] if greedy is not None else self._sample(req, rows[i])
            if token is None:
                self.kv.trim(req, it.start + committed)
                self.end(
                    req,
                    FinishReason.error(
                        "the sampling distribution is invalid (NaN or no possible token)"
                    ),
                )
                return
            self.finisher.append_token(req, token, self.config.context_len)
            committed += 1
            if req.finished or i == len(draft) or token != draft[i] or self._forced(req):
                break
        # KV holds the last token and the accepted drafts: the committed tokens but the newest
        self.kv.trim(req, it.start + committed)
        accepted = committed - 1
        self.state(req).record(len(draft), accepted, self.settings.max_drafts)
        st = self.stats
        st.generated_tokens += committed
        st.spec_verify_rows += 1
        st.spec_draft_tokens += len(draft)
        st.spec_accepted_tokens += accepted
        self.after_append(req)

    def _forced(self, req: Req) -> bool:
        """The grammar forces what comes next: jump-forward appends it (as without
        speculation: forced tokens carry no logprob), so verification stops here."""
        return (
            req.grammar is not None
            and self.config.enable_jump_forward
            and bool(req.grammar.jump_forward_string())
        )

    def _sample(self, req: Req, logits_row: torch.Tensor) -> int | None:
        """One token from ``logits_row`` under ``req``'s current state, as decoding would
        sample it (the sampler modifies its input: a copy); records its logprob."""
        row = logits_row.unsqueeze(0).clone()
        raw = row.clone() if req.return_logprob else None
        token = sample(row, [req], self.finisher.eos_ids)[0]
        if token is not None and raw is not None:
            n = req.top_logprobs_num
            chosen, tops = token_logprobs(raw, [token], n)
            req.output_token_logprobs.append((chosen[0], token, None))
            req.output_top_logprobs.append([(v, t, None) for v, t in tops[0]] if n else None)
        return token


def _plain_argmax(rows: torch.Tensor) -> list[int | None]:
    """Each row's argmax (first maximal index), None for a row with no finite maximum."""
    values, indices = rows.max(dim=-1)
    ok = torch.isfinite(values).tolist()
    return [t if good else None for t, good in zip(indices.tolist(), ok)]


def _grammar_prefix(grammar: Any, drafts: list[int]) -> list[int]:
    """The longest prefix of ``drafts`` the grammar accepts from its current state (the
    state is left as it was)."""
    n = 0
    for token in drafts:
        if grammar.is_terminated() or not grammar.accept_token(token):
            break
        n += 1
    grammar.rollback(n)
    return drafts[:n]
