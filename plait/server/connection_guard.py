"""Connection-level limits uvicorn does not set: how long a client may take to send a request
head and body, how large a head may be, and how long a stream may wait on a client that stopped
reading. Without them a silent or trickling connection holds a file descriptor forever, and a
stream whose reader stalled keeps generating (and holds its KV) to the end.

The limits live in an ``asyncio.Protocol`` (a subclass of uvicorn's h11 protocol), below the
ASGI app, because that is where the bytes and the socket's write buffer are visible:

- **head**: the request line and headers must arrive within ``header_timeout`` seconds of the
  connection opening (on a kept-alive connection, of the next request's first byte), else
  408. The idle time between a response and the next request is ``--keep-alive-timeout``'s
  (uvicorn closes the connection silently): a 408 written onto an idle kept-alive connection
  would be read by a client as the answer to the request it sends next. A head larger than
  ``max_header_bytes`` is a 431. The count of header fields is checked in
  :class:`HeaderCountMiddleware` once the head is parsed (431 too).
- **body**: the whole body must arrive within ``body_timeout`` seconds of the head, else 408.
- **stalled reader**: a response whose writes wait on a full socket buffer for more than
  ``stall_timeout`` seconds is cut (the connection aborted); the route sees a disconnect and
  aborts its requests, freeing their KV slots.

Error responses are written and the connection kept reading (and discarding) for a moment
before it closes, so the client reads the status instead of a TCP reset.

Each request's scope also carries a :class:`ChunkWriter` (``scope["extensions"][CHUNK_WRITER]``):
a streamed response's body chunks written straight to the socket, past the ASGI send chain and
h11 (issue 41: at 256 streams those cost as much as the socket write itself).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol

from plait.server.protocol import error_body

#: how long a refused connection keeps draining the client's bytes before it closes
LINGER_SECONDS = 1.0

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    stall_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100


class StallAwareFlowControl(FlowControl):
    """uvicorn's flow control, except that a write waiting longer than ``stall_timeout`` on a
    full buffer aborts the connection: uvicorn's ``connection_lost`` then marks the request
    disconnected and wakes the waiting writer."""

    def __init__(self, transport: asyncio.Transport, stall_timeout: float):
        super().__init__(transport)
        self.stall_timeout = stall_timeout

    async def drain(self) -> None:
        try:
            await asyncio.wait_for(self._is_writable_event.wait(), self.stall_timeout)
        except asyncio.TimeoutError:
            self._transport.abort()


#: the scope extension under which a request's :class:`ChunkWriter` is found
CHUNK_WRITER = "plait.chunk_writer"


class ChunkWriter:
    """Writes one response's body chunks to its connection as uvicorn's ``send`` would, at a
    fraction of the cost: HTTP/1.1 chunked framing done here, the same flow control (a full
    socket buffer waits, and a stall past the limit aborts the connection), nothing written
    once the client is gone. Usable only between the response's start and its end, both of
    which still go through the ASGI ``send`` (so h11 writes the head and the last chunk and
    keeps the connection's state); :meth:`usable` says whether the response is chunked."""

    def __init__(self, cycle: Any):
        self.cycle = cycle

    def usable(self) -> bool:
        """Whether body chunks may be written here now: the head was sent, the body not
        ended, and h11 frames it as chunks (an HTTP/1.1 client; a 1.0 one reads to close)."""
        cycle = self.cycle
        return (
            cycle.response_started
            and not cycle.response_complete
            and cycle.conn.our_state is h11.SEND_BODY
            and cycle.conn.their_http_version == b"1.1"
            and cycle.scope["method"] != "HEAD"
        )

    async def write(self, data: bytes) -> None:
        """One chunk (empty data writes nothing: an empty chunk would end the body)."""
        cycle = self.cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected or not data:
            return
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(data), data))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with :class:`ConnectionLimits` (set on the subclass that
    :func:`guarded_protocol` makes)."""

    limits: ConnectionLimits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = StallAwareFlowControl(transport, self.limits.stall_timeout)
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes seen, for a terminator split across reads
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # draining a refused client's bytes until the linger ends
        waiting_head = self.conn.their_state is h11.IDLE
        if waiting_head and self._timer is None and data:
            self._arm(self.limits.header_timeout, self._head_timed_out)  # a kept-alive's next head
        if waiting_head and self._head_too_large(data):
            self._refuse(431, f"request headers exceed {self.limits.max_header_bytes} bytes")
            return
        super().data_received(data)
        self._offer_chunk_writer()
        state = self.conn.their_state
        if waiting_head and state is not h11.IDLE:
            self._head_bytes, self._head_tail = 0, b""
            if state is h11.SEND_BODY:
                self._arm(self.limits.body_timeout, self._body_timed_out)
            else:
                self._disarm()
        elif state is h11.DONE and self._timer is not None:
            self._disarm()  # the body is complete

    def _offer_chunk_writer(self) -> None:
        """Put a :class:`ChunkWriter` in the scope of the request just parsed (its ASGI task
        has not run yet: it was only created)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            extensions = cycle.scope.setdefault("extensions", {})
            if CHUNK_WRITER not in extensions:
                extensions[CHUNK_WRITER] = ChunkWriter(cycle)

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the head being received, with ``data``, passes ``max_header_bytes``
        (checked before h11 sees the bytes: past its own limit it answers a bare 400)."""
        seen = self._head_tail + data
        end = seen.find(b"\r\n\r\n")
        head = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._head_tail))
        self._head_bytes, self._head_tail = head, seen[-3:]
        return head > self.limits.max_header_bytes

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            self._refuse(408, f"no complete request head within {self.limits.header_timeout} s")

    def _body_timed_out(self) -> None:
        self._timer = None
        responding = self.cycle is not None and self.cycle.response_started
        if self.conn.their_state is h11.SEND_BODY and not responding:
            if self.cycle is not None:
                self.cycle.disconnected = True  # the app's receive() now reports a disconnect
                self.cycle.message_event.set()
            self._refuse(408, f"request body not complete within {self.limits.body_timeout} s")

    def _refuse(self, status: int, message: str) -> None:
        """Write ``status`` with an OpenAI-style error body, then drain and close."""
        self._disarm()
        self._refused = True
        body = json.dumps(error_body(message, status)).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()  # type: ignore[union-attr]
            self._timer = None


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class HeaderCountMiddleware:
    """431 for a request with more than ``max_count`` header fields (counted after parsing:
    the byte limit has already bounded the work)."""

    def __init__(self, app: Any, max_count: int):
        self.app = app
        self.max_count = max_count

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and len(scope.get("headers") or ()) > self.max_count:
            body = json.dumps(error_body(f"more than {self.max_count} header fields", 431)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 431,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
