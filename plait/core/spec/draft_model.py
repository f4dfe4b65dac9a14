"""STANDALONE speculative decoding's drafts: a smaller checkpoint with the target's tokenizer
proposes each request's next tokens, greedily, on its own model runner and KV pool (same
backend, same device). The target verifies them through ``verify.py`` as it does NGRAM's.

The draft's KV is kept in step with the target by content, not by bookkeeping: each request
has a row in the draft's own request-to-token table holding the KV of ``tokens``, the last
sequence the draft computed for it. Before drafting, the longest common prefix of ``tokens``
and the request's committed sequence is kept and the rest freed (the drafts the target
rejected, and anything else that changed), then one extend pass over every drafting
request's missing tokens gives the first draft from its last row, and ``k - 1`` decode
steps, each one batch over the requests still drafting, give the rest. Accepted drafts are
thus committed (their KV stays) and rejected ones rolled back on the next proposal. The
draft shares no prefix between requests: the first proposal prefills the request's whole
prompt in the draft, so a radix-cache hit on the target, a chunked prefill or a retraction
needs nothing special.

Greedy drafts make a draft a deterministic function of the committed tokens (a point mass
``q``), for which the verify pass's rule (draft ``x`` is kept exactly when the token sampled
from ``p`` is ``x``) is speculative sampling's rule: greedy requests get the tokens of
plain decoding, seeded sampled ones the same tokens too.

What holds: a request's draft KV is freed when the target releases the request (finish,
abort, retraction: :meth:`DraftModel.release`, hooked on ``KVManager.on_release``) or when
it is not among the requests drafting; a failing draft forward fails no request (it is
logged, the draft's KV dropped, and the step decodes without drafts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from plait.core.forward_batch import ExtendItem, GreedyTokens
from plait.core.memory import ReqToTokenPool, TokenSlotAllocator
from plait.core.request import Req

if TYPE_CHECKING:
    from plait.core.backend_api import StepRunner

log = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class DraftSeq:
    """One request's KV in the draft's pool. It stands in for the ``Req`` in the draft
    runner's ``prepare_extend`` / ``prepare_decode``, which read ``req_pool_idx``,
    ``kv_len`` and ``lora_id``."""

    req: Req
    req_pool_idx: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV the row holds, in order
    kv_len: int = 0  # the next decode position (prepare_decode reads it)
    lora_id: None = None


@dataclass(kw_only=True)
class _Work:
    """One request's share of this step's drafting."""

    index: int  # its position among the requests asked
    seq: DraftSeq
    start: int  # tokens whose draft KV is kept
    target: list[int]  # the committed sequence
    slots: torch.Tensor  # KV for target[start:] and the first k - 1 drafts
    k: int  # drafts wanted


class DraftModel:
    """The draft model's runner, KV pool and per-request state (see the module docstring)."""

    def __init__(
        self,
        runner: StepRunner,
        allocator: TokenSlotAllocator,
        req_pool: ReqToTokenPool,
        context_len: int,
    ):
        self.runner = runner
        self.allocator = allocator
        self.req_pool = req_pool
        self.context_len = context_len  # the longest sequence the draft computes
        self.seqs: dict[int, DraftSeq] = {}  # id(req) -> its draft KV
        self.forwards = 0  # draft forward passes run (extend and decode)

    # ----- request state -----

    def release(self, req: Req) -> None:
        """Free ``req``'s draft KV and row (no-op when it holds none)."""
        seq = self.seqs.pop(id(req), None)
        if seq is None:
            return
        self._trim(seq, 0)
        self.req_pool.free(seq.req_pool_idx)

    def release_all(self) -> None:
        for seq in list(self.seqs.values()):
            self.release(seq.req)

    def held_tokens(self) -> int:
        """Draft KV slots held by requests (for tests and info)."""
        return sum(len(s.tokens) for s in self.seqs.values())

    def _trim(self, seq: DraftSeq, n: int) -> None:
        """Keep the KV of ``seq``'s first ``n`` tokens, free the rest."""
        tail = self.req_pool.req_to_token[seq.req_pool_idx, n : len(seq.tokens)].long()
        if tail.numel():
            self.allocator.free(tail)
        del seq.tokens[n:]

    def _seq_for(self, req: Req) -> DraftSeq | None:
        seq = self.seqs.get(id(req))
        if seq is not None:
            if seq.req is req:
                return seq
            self.release(seq.req)  # a request gone unnoticed whose id was reused
        row = self.req_pool.alloc()
        if row is None:
            return None
        seq = self.seqs[id(req)] = DraftSeq(req=req, req_pool_idx=row)
        return seq

    # ----- drafting -----

    def propose(self, reqs: list[Req], budgets: list[int]) -> list[list[int]]:
        """Up to ``budgets[i]`` greedy draft tokens after ``reqs[i]``'s committed sequence.
        Requests not asked lose their draft KV (they are done, or will catch up later)."""
        asked = {id(r) for r in reqs}
        for seq in list(self.seqs.values()):
            if id(seq.req) not in asked or seq.req.finished:
                self.release(seq.req)
        drafts: list[list[int]] = [[] for _ in reqs]
        work = [w for i, (r, k) in enumerate(zip(reqs, budgets)) if (w := self._plan(i, r, k))]
        if not work:
            return drafts
        try:
            self._run(work, drafts)
        except Exception:  # noqa: BLE001 - drafts are optional: decode without them
            log.exception("the draft model's forward failed; this step decodes without drafts")
            for w in work:
                self._free_unused(w)
                self.release(w.seq.req)
            return [[] for _ in reqs]
        return drafts

    def _plan(self, index: int, req: Req, k: int) -> _Work | None:
        """Sync ``req``'s draft KV with its committed tokens and allocate this step's slots;
        None when it drafts nothing (no budget, past the draft's context, KV short)."""
        target = req.fill_ids
        k = min(k, self.context_len - len(target))
        if k <= 0:
            return None
        seq = self._seq_for(req)
        if seq is None:
            return None
        start = _common_prefix(seq.tokens, target, len(target) - 1)
        self._trim(seq, start)
        slots = self.allocator.alloc(len(target) - start + k - 1)
        if slots is None:
            return None
        return _Work(index=index, seq=seq, start=start, target=target, slots=slots, k=k)

    def _run(self, work: list[_Work], drafts: list[list[int]]) -> None:
        items = [
            ExtendItem(
                req=cast(Any, w.seq),
                start=w.start,
                length=len(w.target) - w.start,
                slots=w.slots[: len(w.target) - w.start],
                logit_from=len(w.target) - 1,
                tokens=w.target[w.start :],
            )
            for w in work
        ]
        batch, _ = self.runner.prepare_extend(items)
        first = _argmax(self.runner.run(batch))
        self.forwards += 1
        live: list[_Work] = []
        for w, token in zip(work, first):
            w.seq.tokens = list(w.target)
            if token is not None:
                drafts[w.index].append(token)
                live.append(w)
        step = 1
        while live := [w for w in live if w.k > step]:
            self._decode(live, drafts, step)
            step += 1
        for w in work:
            self._free_unused(w)

    def _free_unused(self, w: _Work) -> None:
        """Free the slots of drafts never fed (a draft cut short by an invalid row, or a
        failed forward): ``seq.tokens`` is the target's ``start`` tokens and what was fed."""
        used = len(w.seq.tokens) - w.start
        if used < len(w.slots):
            self.allocator.free(w.slots[used:])

    def _decode(self, live: list[_Work], drafts: list[list[int]], step: int) -> None:
        """Feed each request's newest draft (position ``len(tokens)``) and append the next."""
        slots = torch.stack([w.slots[len(w.target) - w.start + step - 1] for w in live])
        inputs = [drafts[w.index][-1] for w in live]
        for w, token in zip(live, inputs):
            w.seq.kv_len = len(w.seq.tokens)
            w.seq.tokens.append(token)
        batch = self.runner.prepare_decode(cast(Any, [w.seq for w in live]), slots, inputs)
        batch.greedy_only = True
        nxt = _argmax(self.runner.run(batch))
        self.forwards += 1
        for w, nxt_token in zip(live, nxt):
            if nxt_token is None:
                w.k = step  # stop this request's draft here
            else:
                drafts[w.index].append(nxt_token)


def _argmax(out: torch.Tensor | GreedyTokens) -> list[int | None]:
    """Each row's greedy token; None for a row with no finite maximum."""
    if isinstance(out, GreedyTokens):
        return out.tokens
    values, indices = out.max(dim=-1)
    ok = torch.isfinite(values).tolist()
    return [t if good else None for t, good in zip(indices.tolist(), ok)]


def _common_prefix(a: list[int], b: list[int], cap: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``cap``."""
    n = min(len(a), len(b), cap)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
