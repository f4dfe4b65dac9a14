"""The HTTP process's side of streaming: turns a step's batched items from the scheduler
process (``plait.server.step_outbox``) back into the cumulative output dicts the API handlers
read, detokenizing incrementally here -- off the scheduler process's GIL.

One :class:`StreamText` per running request. While it runs, each item adds its new ids
(:meth:`StreamText.push`, on the message loop: no decoding there); the request's handler
then asks for the cumulative output once when it wakes (:meth:`StreamText.output`). So a
handler that wakes after several steps (the HTTP process lagging behind the scheduler) decodes
and sends once for all of them -- one event per stream and wake, SGLang's tokenizer manager's
"latest output wins" -- rather than once per step. A client that streams gets the text released
so far (``IncrementalDetokenizer``: never a partial character), the ids so far and the usual
``meta_info``; one that does not stream needs only the token count (timing metrics), so
nothing is decoded for it. The last item of every request carries the engine's own final
output, whose text the engine decoded once: it is passed on as it is, so the final text never
depends on this side.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from plait.core.detokenizer import IncrementalDetokenizer
from plait.core.messages import GenerateReq
from plait.server.protocol import APIError

#: the queue item that says "new ids were pushed": its handler builds the output when it wakes
IDS = ("ids", None, False)


class FastDecode:
    """``tokenizer.decode`` straight through the Rust ``tokenizers`` backend: the same text
    as transformers' ``decode`` when that adds nothing to the backend's (no clean-up of
    tokenization spaces), without its per-call Python conversions (a third of the HTTP
    process's decode time at 256 streams)."""

    def __init__(self, backend: Any):
        self.backend = backend

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **_: Any) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def fast_decoder(tokenizer: Any) -> Any:
    """:class:`FastDecode` over ``tokenizer``'s backend where it gives transformers' text,
    else ``tokenizer`` itself."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer
    return FastDecode(backend)


class StreamText:
    def __init__(self, req: GenerateReq, tokenizer: Any):
        sp = req.sampling_params
        self.rid = req.rid
        self.started = time.perf_counter()
        self.ids: list[int] = []
        self.prompt_tokens = self.cached_tokens = 0
        self.pending = False  # an IDS item is queued and not yet taken
        self.detok = (
            IncrementalDetokenizer(
                fast_decoder(tokenizer), sp.skip_special_tokens, sp.spaces_between_special_tokens
            )
            if req.stream
            else None
        )

    def push(self, new_ids: list[int], prompt_tokens: int, cached_tokens: int) -> None:
        """Record a step's new ids (no decoding: see :meth:`output`)."""
        self.ids.extend(new_ids)
        self.prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens

    def output(self) -> dict:
        """The cumulative output of every id pushed so far."""
        ids = self.ids
        meta = {
            "id": self.rid,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(ids),
            "cached_tokens": self.cached_tokens,
            "finish_reason": None,
            "e2e_latency": time.perf_counter() - self.started,
        }
        if self.detok is None:
            return {"text": "", "output_ids": [], "meta_info": meta}
        self.detok.update(ids)
        return {"text": self.detok.text, "output_ids": list(ids), "meta_info": meta}

    def advance(self, new_ids: list[int], prompt_tokens: int, cached_tokens: int) -> dict:
        """The cumulative output after ``new_ids``."""
        self.push(new_ids, prompt_tokens, cached_tokens)
        return self.output()


def route_batch(
    msg: dict[str, Any],
    texts: dict[str, StreamText],
    queues: dict[str, asyncio.Queue],
    metrics: Any,
    now: float,
) -> None:
    """One step's outputs (a ``"batch"`` message), counted by ``metrics``
    (``ServerMetrics.on_tokens`` per stream, published once per step): a lite item's ids are pushed to its ``StreamText`` and
    :data:`IDS` queued unless one is already waiting; a full output is queued as
    ``("out", out, finished)``; each error as ``("error", status, message)``."""
    for rid, finished, new_ids, out, prompt_tokens, cached_tokens in msg["outs"]:
        q = queues.get(rid)
        if out is None:
            text = texts.get(rid)
            if text is None:  # its client is gone
                continue
            text.push(new_ids, prompt_tokens, cached_tokens)
            metrics.on_tokens(rid, len(text.ids), now)
            if q is not None and not text.pending:
                text.pending = True
                q.put_nowait(IDS)
            continue
        metrics.on_output(rid, out, finished, now)
        if q is not None:
            q.put_nowait(("out", out, finished))
    metrics.end_step(now)
    for rid, status, message in msg["errors"]:
        q = queues.get(rid)
        if q is not None:
            q.put_nowait(("error", status, message))


async def latest_item(q: asyncio.Queue, deadline: float | None, timeout: float | None) -> tuple:
    """The request's next item, coalesced: whatever queued behind it by the time its handler
    runs supersedes it (outputs are cumulative), except an error, which is returned at once.
    A handler that lags behind the scheduler thus sends one event for several steps.
    ``APIError`` 504 past ``deadline``."""
    try:
        item = await asyncio.wait_for(
            q.get(), None if deadline is None else max(deadline - time.monotonic(), 0)
        )
    except asyncio.TimeoutError:
        raise APIError(
            f"the request took longer than the server's request "
            f"timeout ({timeout:g}s) and was aborted",
            status=504,
        ) from None
    while item[0] != "error" and not q.empty():
        item = q.get_nowait()
    return item
