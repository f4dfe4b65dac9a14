"""Server-sent events on the cheapest per-event path (issue 41: 256 concurrent streams at the
engine's step rate).

An event's JSON is encoded once, by orjson, straight to UTF-8 bytes (``ensure_ascii=False``
as before: text is not escaped). :class:`SSEResponse` writes each chunk its iterator yields
with one ASGI send: a handler coalesces what one wake produced (the events of one step, or of
several when it lagged) into one chunk, so a stream costs one send -- one HTTP chunk, one
socket write -- per wake. Unlike Starlette's ``StreamingResponse`` it runs no anyio task group
per stream: a plain asyncio task waits for the client's disconnect and cancels the stream
(whose iterator then aborts its requests), and sends go straight to the server. Where the
server offers a :class:`~plait.server.connection_guard.ChunkWriter` (plait's own uvicorn
protocol does), the body chunks between the head and the end are written by it, past the ASGI
send chain and h11 (a third of the per-event cost at 256 streams); the head and the end still
go through ``send``.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from plait.server.connection_guard import CHUNK_WRITER

_OPTIONS = orjson.OPT_NON_STR_KEYS


def sse(obj: Any) -> bytes:
    """One ``data:`` event."""
    return b"data: " + orjson.dumps(obj, option=_OPTIONS) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes]):
        self.body_iterator = chunks
        self.status_code = 200
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        writer = scope.get("extensions", {}).get(CHUNK_WRITER)
        if writer is not None and writer.usable():
            write = writer.write
        else:

            async def write(chunk: bytes) -> None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        me = asyncio.current_task()
        state = {"ended": False, "gone": False}

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["ended"]:
                state["gone"] = True
                me.cancel()  # the iterator sees CancelledError where it waits, and cleans up

        listener = asyncio.create_task(listen())
        try:
            async for chunk in self.body_iterator:
                await write(chunk)
                if state["gone"]:
                    # the cancel can be lost: Python 3.11's wait_for (in the server's write
                    # flow control) swallows one that lands as its wait completes
                    return
            state["ended"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            me.uncancel()  # the client left: a normal end for the server
        finally:
            state["ended"] = True
            listener.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
