"""Turn a batch of next-token logits into tokens, honouring each request's sampling params.

Greedy rows take an argmax of the raw logits (bit-for-bit what transformers' greedy search
does); penalties, ``logit_bias``, grammar masks, temperature and the top-k/top-p/min-p filters
apply only to the rows that ask for them. A bias is added to the logits before the argmax as
before sampling, so it steers greedy requests too; logprobs stay the model's own (they are
taken from the logits before any of this, as the rows' ``raw`` copy).

Isolation: rows are independent. A row whose distribution is invalid (NaN, no finite logit,
probabilities that do not sum to a positive finite number) gets ``None`` instead of a token;
the caller fails that request alone and its neighbours' tokens are exactly what they would
have been without it.
"""

from __future__ import annotations

import torch

from plait.core.request import Req


def apply_penalties(logits: torch.Tensor, reqs: list[Req]) -> None:
    """In place: OpenAI frequency/presence penalties over output tokens, HF-style repetition
    penalty over prompt and output tokens."""
    for i, req in enumerate(reqs):
        sp = req.sampling
        if sp.frequency_penalty or sp.presence_penalty:
            if req.output_ids:
                ids = torch.tensor(req.output_ids, device=logits.device)
                counts = torch.bincount(ids, minlength=logits.shape[1])[: logits.shape[1]].float()
                logits[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)
        if sp.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(req.fill_ids)), device=logits.device)
            vals = logits[i, ids]
            logits[i, ids] = torch.where(
                vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty
            )


def apply_logit_bias(logits: torch.Tensor, reqs: list[Req]) -> None:
    """In place: add each request's ``logit_bias`` to its row. One scatter-add over the
    biased rows' (row, token) pairs; rows without a bias are not touched. -inf (a grammar or
    ``min_new_tokens`` mask) plus a finite bias stays -inf, so the order of the two is free."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, req in enumerate(reqs):
        bias = req.sampling.logit_bias
        if bias:
            rows.extend([i] * len(bias))
            cols.extend(bias.keys())
            vals.extend(bias.values())
    if rows:
        device = logits.device
        logits.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
            torch.tensor(vals, dtype=logits.dtype, device=device),
            accumulate=True,
        )


def mask_min_tokens(logits: torch.Tensor, reqs: list[Req], eos_ids: set[int]) -> None:
    """Forbid EOS and stop tokens until a request has ``min_new_tokens`` outputs."""
    for i, req in enumerate(reqs):
        sp = req.sampling
        # a grammar decides for itself when EOS is allowed; banning it could leave no token
        if len(req.output_ids) < sp.min_new_tokens and req.grammar is None:
            banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else eos_ids)
            if banned:
                logits[i, list(banned)] = float("-inf")


def filter_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """Probabilities of one row after temperature, top-k, top-p and min-p."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = (cum - sorted_p) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if min_p > 0.0:
        probs = torch.where(probs < min_p * probs.max(), 0.0, probs)
    return probs / probs.sum()


def takes_plain_argmax(req: Req) -> bool:
    """Whether every token of ``req`` is the argmax of the raw logits, whatever its state:
    greedy, no penalties, no ``logit_bias``, no ``min_new_tokens`` masking, no grammar, no
    logprobs. A batch of only such requests may be answered with tokens instead of logits
    (``ForwardBatch.greedy_only``: the CPU backend's fused greedy LM head never sees a bias)."""
    sp = req.sampling
    return (
        sp.is_greedy
        and not sp.frequency_penalty
        and not sp.presence_penalty
        and sp.repetition_penalty == 1.0
        and sp.min_new_tokens == 0
        and not sp.logit_bias
        and req.grammar is None
        and not req.return_logprob
    )


def _greedy_and_valid(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Per row, in one pass over [B, V]: the argmax, and whether the row is valid (a token is
    possible, nothing is NaN or +inf, which swamps softmax). The row maximum decides validity:
    it is NaN when any logit is, +inf when any is, -inf when none is possible. ``max`` returns
    the first maximal index, as ``argmax`` (and transformers' greedy search) does."""
    values, indices = logits.max(dim=-1)
    return indices.tolist(), torch.isfinite(values).tolist()


def _sample_row(logits: torch.Tensor, req: Req) -> int | None:
    sp = req.sampling
    probs = filter_probs(logits, sp.temperature, sp.top_k, sp.top_p, sp.min_p)
    total = float(probs.sum())
    if not (total > 0 and torch.isfinite(probs).all() and bool((probs >= 0).all())):
        return None
    return int(torch.multinomial(probs, 1, generator=req.generator))


def sample(logits: torch.Tensor, reqs: list[Req], eos_ids: set[int]) -> list[int | None]:
    """One token per row of ``logits`` ([B, V], float32, modified in place); ``None`` for a
    row whose distribution is invalid (see the module docstring)."""
    needs_processing = any(
        r.sampling.frequency_penalty
        or r.sampling.presence_penalty
        or r.sampling.repetition_penalty != 1.0
        or len(r.output_ids) < r.sampling.min_new_tokens
        or r.sampling.logit_bias
        or r.grammar is not None
        for r in reqs
    )
    if needs_processing:
        apply_penalties(logits, reqs)
        apply_logit_bias(logits, reqs)
        mask_min_tokens(logits, reqs, eos_ids)
        if any(r.grammar is not None for r in reqs):
            from plait.core.grammar import apply_grammar_masks

            apply_grammar_masks(logits, [r.grammar for r in reqs])
    greedy, ok = _greedy_and_valid(logits)
    tokens: list[int | None] = []
    for i, req in enumerate(reqs):
        if not ok[i]:
            tokens.append(None)
            continue
        if req.sampling.is_greedy:
            tokens.append(greedy[i])
            continue
        try:
            tokens.append(_sample_row(logits[i], req))
        except RuntimeError:  # torch refused this row's distribution: it alone fails
            tokens.append(None)
    return tokens


def token_logprobs(
    logits: torch.Tensor, token_ids: list[int], top_k: int
) -> tuple[list[float], list[list[tuple[float, int]]]]:
    """Log-probabilities of ``token_ids`` under each row of ``logits`` (the model's own
    distribution, before sampling filters), plus each row's top-k alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(token_ids)), torch.tensor(token_ids)].tolist()
    tops: list[list[tuple[float, int]]] = []
    if top_k > 0:
        vals, idx = logp.topk(top_k, dim=-1)
        tops = [list(zip(v, i)) for v, i in zip(vals.tolist(), idx.tolist())]
    return chosen, tops
