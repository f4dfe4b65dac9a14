"""NGRAM drafts: guesses of a request's next tokens, copied from text it has seen.

Two sources, tried in this order:

1. The prefix cache: when the request's whole sequence (prompt and output so far) is a path
   of the radix tree that continues (another request with the same start went further: a
   repeated prompt, an earlier turn), the continuation is the draft.
2. The request's own sequence: the longest suffix n-gram (``max_match`` down to
   ``min_match`` tokens) that occurred before, most recent occurrence first; the tokens that
   followed it are the draft. A shared document in the prompt proposes this way, and so does
   a quote or an edit of it.

Each request's draft length adapts to what its drafts achieved (:class:`DraftState`): a
fully accepted draft grows the next one, a partial one shrinks it to what was accepted plus
one, and a draft with nothing accepted pauses proposing for a number of steps that doubles
with each miss in a row, so free prose costs little more than plain decoding. It also keeps a
running estimate of how often one of its drafts is accepted (:meth:`DraftState.acceptance`),
which ``cost.py`` weighs against what a verified token costs at the current batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_COOLDOWN = 32
ACCEPT_DECAY = 0.8  # weight of the evidence so far at each verify pass with a draft


@dataclass
class DraftState:
    """One request's proposer state and speculation counters (``Req.spec``)."""

    budget: int  # drafts the next proposal may have
    index: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> last end
    indexed: int = 0  # n-grams ending before this position are in ``index``
    misses: int = 0  # drafts in a row with nothing accepted
    cooldown: int = 0  # steps left without proposing
    verify_ct: int = 0  # decode-phase forwards (verify passes and plain decode steps)
    draft_tokens: int = 0  # drafts verified
    accepted_tokens: int = 0  # drafts accepted
    # decayed counts of drafts accepted and rejected (at most one per pass); the start values
    # are a prior that decays like the evidence: a new request's acceptance is 0.8
    hits: float = 4.0
    rejections: float = 1.0
    capped: int = 0  # steps in a row the cost model allowed no draft (``cost.py``)
    # a draft the cost model did not let verify, and the sequence length it continues: the
    # token decoding commits there says whether its first draft would have been accepted
    shadow: int | None = None
    shadow_at: int = 0

    def next_budget(self) -> int:
        """Drafts the next proposal may have (0 while cooling down after misses)."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return 0
        return self.budget

    def record(self, drafted: int, accepted: int, max_drafts: int) -> None:
        """One verify pass: ``accepted`` of ``drafted`` drafts matched the model."""
        self.verify_ct += 1
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        if drafted == 0:
            return
        self.hits = ACCEPT_DECAY * self.hits + accepted
        self.rejections = ACCEPT_DECAY * self.rejections + (accepted < drafted)
        if accepted == drafted:
            self.budget = min(max_drafts, self.budget + 2)
        else:
            self.budget = max(1, accepted + 1)
        if accepted == 0:
            self.misses += 1
            self.cooldown = min(2**self.misses, MAX_COOLDOWN)
        else:
            self.misses = 0

    def remember(self, drafts: list[int], at: int) -> None:
        """``drafts`` continued the sequence at length ``at`` but were not verified."""
        self.shadow, self.shadow_at = (drafts[0], at) if drafts else (None, 0)

    def check_shadow(self, seq: list[int]) -> None:
        """Count the remembered unverified draft once ``seq`` has gone past it: its first token
        accepted or rejected, as one verify pass of one draft would have (the estimate stays
        current while the cost model withholds drafts)."""
        if self.shadow is None or len(seq) <= self.shadow_at:
            return
        hit = seq[self.shadow_at] == self.shadow
        self.shadow = None
        self.hits = ACCEPT_DECAY * self.hits + hit
        self.rejections = ACCEPT_DECAY * self.rejections + (not hit)

    def acceptance(self) -> float:
        """The chance that a draft is accepted given the drafts before it were: verification
        stops at the first rejection, so each pass gives ``accepted`` successes and at most
        one failure (recent passes weigh more)."""
        return self.hits / (self.hits + self.rejections)


def own_ngram_draft(
    state: DraftState, seq: list[int], k: int, min_match: int, max_match: int
) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of ``seq``'s
    longest suffix n-gram (``max_match`` down to ``min_match`` tokens); [] if none occurred.
    A continuation that runs into the end of ``seq`` repeats itself (a loop continues)."""
    _catch_up(state, seq, min_match, max_match)
    n_seq = len(seq)
    for n in range(min(max_match, n_seq - 1), min_match - 1, -1):
        end = state.index.get(tuple(seq[n_seq - n :]))
        if end is None:
            continue
        ext = seq[end + 1 :]
        draft: list[int] = []
        j = 0
        while len(draft) < k:
            draft.append(ext[j] if j < len(ext) else draft[j - len(ext)])
            j += 1
        return draft
    return []


def _catch_up(state: DraftState, seq: list[int], min_match: int, max_match: int) -> None:
    """Index the n-grams ending at positions ``indexed .. len(seq) - 2``: the last position is
    the suffix being looked up, which must find an earlier occurrence."""
    index = state.index
    for end in range(state.indexed, len(seq) - 1):
        for n in range(min_match, min(max_match, end + 1) + 1):
            index[tuple(seq[end - n + 1 : end + 1])] = end
    state.indexed = max(state.indexed, len(seq) - 1)


def radix_draft(cache: Any, seq: list[int], k: int) -> list[int]:
    """Up to ``k`` tokens by which the radix tree continues ``seq`` when all of ``seq`` is a
    path in it (the most recently used branch where it forks); [] otherwise. Reads the tree
    only (no split, no access-time update). Page size 1 (speculation requires it)."""
    node = getattr(cache, "root_node", None)
    if node is None or not seq:
        return []
    i = 0
    while i < len(seq):
        child = node.children.get(seq[i])
        if child is None:
            return []
        key = child.key
        m = min(len(key), len(seq) - i)
        if key[:m] != seq[i : i + m]:
            return []
        i += m
        node = child
        if m < len(key):
            return _continue(node, key[m : m + k], k)
    return _continue(node, [], k)


def _continue(node: Any, draft: list[int], k: int) -> list[int]:
    while len(draft) < k and node.children:
        node = max(node.children.values(), key=lambda c: c.last_access_time)
        draft = draft + node.key[: k - len(draft)]
    return draft


def propose(
    state: DraftState, seq: list[int], cache: Any, k: int, min_match: int, max_match: int
) -> list[int]:
    """The draft for a request whose committed tokens are ``seq``: at most ``k`` tokens."""
    if k <= 0:
        return []
    return radix_draft(cache, seq, k) or own_ngram_draft(state, seq, k, min_match, max_match)
