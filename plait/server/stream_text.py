"""The HTTP process's side of streaming: turns a step's batched items from the scheduler
process (``plait.server.step_outbox``) back into the cumulative output dicts the API handlers
read, detokenizing incrementally here -- off the scheduler process's GIL.

One :class:`StreamText` per running request. While it runs, each item adds its new ids; a
client that streams gets the text released so far (``IncrementalDetokenizer``: never a partial
character), the ids so far and the usual ``meta_info``; one that does not stream needs only
the token count (timing metrics), so nothing is decoded for it. The last item of every request
carries the engine's own final output, whose text the engine decoded once: it is passed on
as it is, so the final text never depends on this side.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from plait.core.detokenizer import IncrementalDetokenizer
from plait.core.messages import GenerateReq


class StreamText:
    def __init__(self, req: GenerateReq, tokenizer: Any):
        sp = req.sampling_params
        self.rid = req.rid
        self.started = time.perf_counter()
        self.ids: list[int] = []
        self.detok = (
            IncrementalDetokenizer(
                tokenizer, sp.skip_special_tokens, sp.spaces_between_special_tokens
            )
            if req.stream
            else None
        )

    def advance(self, new_ids: list[int], prompt_tokens: int, cached_tokens: int) -> dict:
        """The cumulative output after ``new_ids``."""
        ids = self.ids
        ids.extend(new_ids)
        meta = {
            "id": self.rid,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(ids),
            "cached_tokens": cached_tokens,
            "finish_reason": None,
            "e2e_latency": time.perf_counter() - self.started,
        }
        if self.detok is None:
            return {"text": "", "output_ids": [], "meta_info": meta}
        self.detok.update(ids)
        return {"text": self.detok.text, "output_ids": list(ids), "meta_info": meta}


def route_batch(
    msg: dict[str, Any],
    texts: dict[str, StreamText],
    queues: dict[str, asyncio.Queue],
    metrics: Any,
    now: float,
) -> None:
    """One step's outputs (a ``"batch"`` message): each request's cumulative output rebuilt
    and queued for its handler, counted by ``metrics`` (``ServerMetrics.on_output``); each
    error queued as ``("error", status, message)``."""
    for rid, finished, new_ids, out, prompt_tokens, cached_tokens in msg["outs"]:
        if out is None:
            text = texts.get(rid)
            if text is None:  # its client is gone
                continue
            out = text.advance(new_ids, prompt_tokens, cached_tokens)
        metrics.on_output(rid, out, finished, now)
        q = queues.get(rid)
        if q is not None:
            q.put_nowait(("out", out, finished))
    for rid, status, message in msg["errors"]:
        q = queues.get(rid)
        if q is not None:
            q.put_nowait(("error", status, message))
