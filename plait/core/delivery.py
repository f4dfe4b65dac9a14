"""Delivering a call's outputs from the scheduler thread to its caller, one path for
synchronous and asyncio callers alike.

A :class:`Delivery` belongs to one ``generate`` call. On the scheduler thread,
``on_output`` snapshots a request's output and hands it to ``put`` (a ``queue.Queue``'s
``put``, or a ``call_soon_threadsafe`` onto an ``asyncio.Queue``); the caller takes the
snapshots from its queue, sync or async, and everything else is written once here: results
come back in the order of the requests, not of their finishing, and a stream the consumer
leaves early aborts its unfinished requests, so their KV is freed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from plait.core.messages import GenerateReq
from plait.core.request import Req
from plait.core.request_output import RequestFinisher

Output = tuple[str, bool, dict]  # (rid, finished, output)


class Delivery:
    def __init__(self, reqs: list[Req], put: Callable[[Output], Any], abort: Callable[[str], None]):
        self.reqs = reqs
        self._put = put
        self._abort = abort
        self._remaining = {r.rid for r in reqs}
        self._finished: dict[str, dict] = {}

    def on_output(self, req: Req, finished: bool) -> None:
        """Scheduler thread: queue a snapshot of ``req``'s output (every step's when it
        streams, else the final one). The consumer must not read ``req`` itself, which may
        have finished (an abort, say) since this output was taken; a stream would then stop
        before its final output."""
        if finished or req.stream:
            self._put((req.rid, finished, output_of(req)))

    @property
    def done(self) -> bool:
        return not self._remaining

    def take(self, item: Output) -> dict:
        """Caller's thread: record one snapshot from the queue; returns its output."""
        rid, finished, out = item
        if finished:
            self._remaining.discard(rid)
            self._finished[rid] = out
        return out

    def results(self, batched: bool) -> dict | list[dict]:
        """The final outputs in request order; a single one unwrapped unless ``batched``."""
        ordered = [self._finished[r.rid] for r in self.reqs]
        return ordered if batched or len(ordered) > 1 else ordered[0]

    def stream(self, get: Callable[[], Output]) -> Iterator[dict]:
        try:
            while not self.done:
                yield self.take(get())
        finally:
            self._abort_unfinished()

    async def astream(self, get: Callable[[], Awaitable[Output]]) -> AsyncIterator[dict]:
        try:
            while not self.done:
                yield self.take(await get())
        finally:
            self._abort_unfinished()

    def _abort_unfinished(self) -> None:
        """The consumer stopped early: free the unfinished requests' KV."""
        for rid in self._remaining:
            self._abort(rid)


def output_of(req: Req) -> dict:
    """SGLang's output dict for ``req``: the text so far (only what can no longer turn out to
    be a stop string, while it runs), the ids, and ``meta_info``."""
    text = req.text if req.finished else RequestFinisher.streamable_text(req)
    end = req.finished_time or req.first_token_time or req.created
    meta = {
        "id": req.rid,
        "prompt_tokens": len(req.input_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": req.cached_tokens,
        "finish_reason": req.finish_reason,
        "e2e_latency": end - req.created,
    }
    if req.spec is not None:  # SGLang's names: forwards, and drafts verified and accepted
        meta.update(
            spec_verify_ct=req.spec.verify_ct,
            spec_draft_token_num=req.spec.draft_tokens,
            spec_accept_token_num=req.spec.accepted_tokens,
            spec_accept_length=(len(req.output_ids) - 1) / req.spec.verify_ct
            if req.spec.verify_ct
            else 0.0,
        )
    if req.return_logprob:
        meta.update(
            input_token_logprobs=req.input_token_logprobs,
            output_token_logprobs=req.output_token_logprobs,
            input_top_logprobs=req.input_top_logprobs,
            output_top_logprobs=req.output_top_logprobs,
        )
    return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}


def one_stream_flag(msgs: list[GenerateReq]) -> bool:
    """Whether the call streams: every message must say the same."""
    flags = {m.stream for m in msgs}
    if len(flags) > 1:
        raise ValueError("stream must be the same for every prompt of a request")
    return flags.pop() if flags else False
