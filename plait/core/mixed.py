"""Mixed prefill and decode in one forward (``enable_mixed_chunk``, SGLang's
``--enable-mixed-chunk``; vLLM's chunked prefill does the same by default).

Without it a step either extends (a prompt, or one chunk of it) or decodes: while a long
prompt is prefilled chunk by chunk, every running request waits for it (its inter-token
latency is the whole prefill), and the prefill's products run without the decodes' rows.
With it, a step that has both carries them in one extend batch: the planned prefill items
first, then every running request's next token as an extend item of length 1 (its position
``kv_len``, its input the last token or the overlap schedule's placeholder for it).

What holds:
- Decodes come first: their KV slots are allocated (the retraction ladder included) before
  admission, and the prefill's token budget (``chunked_prefill_size``, else
  ``max_prefill_tokens``) is what the decode rows leave of it. When they leave nothing the
  step is a plain decode, and the prompt waits until decodes finish.
- A decode row is planned exactly as in a decode batch (the output count it must match, its
  placeholder, ``kv_len`` advanced) and processed as one: the same requests get the same
  tokens as without mixing, up to float rounding in the kernels that compute the row.
- ``PlannedBatch.items`` and ``row_counts`` hold the prefill items only, so prompt logprobs
  and ``max_new_tokens=0`` finishes see nothing of the decode rows; their logits rows follow
  the prefill's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from plait.core.batch_executor import PlannedBatch
from plait.core.decode_traits import traits_of
from plait.core.forward_batch import ExtendItem
from plait.core.future_tokens import FutureTokenMap
from plait.core.request import Req
from plait.core.scheduler_config import SchedulerStats


def decode_items(reqs: list[Req], slots: torch.Tensor) -> list[ExtendItem]:
    """Each request's next decode as an extend item of one token at position ``kv_len``
    (the token, or the placeholder of the token still in flight)."""
    return [
        ExtendItem(
            req=r,
            start=r.kv_len,
            length=1,
            slots=slots[i : i + 1],
            logit_from=r.kv_len,
            tokens=[r.future if r.future is not None else r.output_ids[-1]],
        )
        for i, r in enumerate(reqs)
    ]


def claim_decode_rows(
    reqs: list[Req], futures: Sequence[int], context_len: int, eos_ids: set[int]
) -> tuple[list[int], bool, bool, bool]:
    """Commit one decode token per request: record the output count its token must still
    match, give it placeholder ``futures[i]`` and advance its ``kv_len``. Returns
    ``(expect, pending, plain, needs_state)``: whether some input is a placeholder, whether
    every request takes the plain argmax, whether some sampling reads request state."""
    expect, pending = [], False
    plain, needs_state = True, False
    for req, f in zip(reqs, futures):
        traits = req.traits or traits_of(req, context_len, eos_ids)
        if req.future is None:
            expect.append(len(req.output_ids))
        else:
            expect.append(len(req.output_ids) + 1)
            pending = True
        req.future = f
        req.kv_len += 1
        plain = plain and traits.plain_argmax
        needs_state = needs_state or traits.needs_state
    return expect, pending, plain, needs_state


def add_decode_rows(
    plan: PlannedBatch,
    reqs: list[Req],
    futures: FutureTokenMap,
    stats: SchedulerStats,
    context_len: int,
    eos_ids: set[int],
) -> None:
    """Append the decode rows of ``reqs`` to ``plan``, an extend batch built over the prefill
    items and then ``decode_items(reqs, ...)``: their logits rows follow every prefill row.
    Claims their tokens (:func:`claim_decode_rows`) and counts the mixed forward."""
    ids = futures.reserve(len(reqs))
    expect, pending, _, needs_state = claim_decode_rows(reqs, ids, context_len, eos_ids)
    first = len(plan.batch.logits_rows) - len(reqs)
    plan.reqs = [*plan.reqs, *reqs]
    plan.sample_reqs = [*plan.sample_reqs, *reqs]
    plan.sample_rows = [*plan.sample_rows, *range(first, first + len(reqs))]
    plan.expect = [*plan.expect, *expect]
    plan.futures = [*plan.futures, *ids]
    plan.needs_state = plan.needs_state or needs_state
    plan.has_placeholders = plan.has_placeholders or pending
    stats.mixed_forward_passes += 1
    stats.mixed_decode_rows += len(reqs)
