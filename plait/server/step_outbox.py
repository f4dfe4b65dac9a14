"""The scheduler process's side of streaming: a step's outputs leave in one message.

Per request and step the engine's scheduler thread calls :meth:`StepOutbox.on_output`. That
call only snapshots what the HTTP process cannot work out itself and queues it; the first item
of a batch wakes the scheduler process's event loop once (``call_soon_threadsafe``), which
sends everything queued by then as one ZeroMQ message. So the scheduler thread spends no time
on per-request asyncio tasks, pickling or sockets, and the HTTP process receives one message
per step instead of one per stream.

Items (tuples, cheap to pickle):
  ``(rid, finished, new_ids, None, prompt_tokens, cached_tokens)`` -- a *lite* request (or one
      whose client does not stream) while it runs: the token ids produced since its previous
      item; the HTTP process detokenizes them (``plait.server.stream_text``), off this
      process's GIL, and a client that does not stream needs only their count.
  ``(rid, finished, None, out, 0, 0)`` -- everything else, and every request's last item: the
      engine's full output dict (``plait.core.delivery.output_of``; the final text was decoded
      by the engine).
A request is lite when nothing but its ids changes per step: no stop strings (the engine must
detokenize to find them) and no logprobs. An engine failure (finish reason ``error``) becomes an
``(rid, status, message)`` entry of the message's ``errors``. The wire message is
``{"op": "batch", "outs": [...], "errors": [...]}``.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Callable

from plait.core.delivery import output_of
from plait.core.request import Req

Item = tuple[str, bool, "list[int] | None", "dict[str, Any] | None", int, int]


def is_lite(req: Req) -> bool:
    """Whether only ``req``'s ids need to leave the scheduler per step (see the module doc)."""
    return not req.sampling.stop and not req.return_logprob


class StepOutbox:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        send: Callable[[dict[str, Any]], None],
        on_finished: Callable[[str], None],
    ):
        self._loop = loop
        self._send = send
        self._on_finished = on_finished
        self._queue: collections.deque[Item] = collections.deque()  # appends/pops thread-safe
        self._sent: dict[str, int] = {}  # scheduler thread only: ids already sent per rid
        self._ids_only: set[str] = set()  # rids whose running items carry only new ids
        self._wake_pending = False

    def prepare(self, reqs: list[Req], client_streams: bool) -> None:
        """Before submission: lite requests are detokenized by the HTTP process, not here;
        every request reports each step (progress and timing metrics), with only its new ids
        when it is lite or its client does not stream."""
        for req in reqs:
            req.stream = True
            req.detokenize_later = is_lite(req)
            if req.detokenize_later or not client_streams:
                self._ids_only.add(req.rid)

    def on_output(self, req: Req, finished: bool) -> None:
        """Scheduler thread: queue ``req``'s item; wake the loop if none is pending."""
        rid = req.rid
        if finished or rid not in self._ids_only:
            self._sent.pop(rid, None)
            self._ids_only.discard(rid)
            item: Item = (rid, finished, None, output_of(req), 0, 0)
        else:
            ids = req.output_ids
            sent = self._sent.get(rid, 0)
            self._sent[rid] = len(ids)
            item = (rid, False, ids[sent:], None, len(req.input_ids), req.cached_tokens)
        self._queue.append(item)
        # cleared by flush before it drains: an item appended after the drain sees it False
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        """Event loop: send what is queued as one message."""
        self._wake_pending = False
        outs: list[Item] = []
        errors: list[tuple[str, int, str]] = []
        queue = self._queue
        while queue:
            item = queue.popleft()
            out = item[3]
            if item[1]:
                self._on_finished(item[0])
                reason = (out or {}).get("meta_info", {}).get("finish_reason")
                if isinstance(reason, dict) and reason.get("type") == "error":
                    # the engine failed this request (not the client's doing): never a 200
                    errors.append((item[0], 500, f"engine error: {reason.get('message')}"))
                    continue
            outs.append(item)
        if outs or errors:
            self._send({"op": "batch", "outs": outs, "errors": errors})
