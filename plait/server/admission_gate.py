"""The admission gate: shed an overloaded server's new generation requests before they cost
anything, and stamp the ones it lets through with their arrival time.

Under overload most requests are refused, so a refusal must be cheap: checked after the
routes had parsed the JSON body (pydantic) and tokenized the prompt, each 503 cost about as
much HTTP-process CPU as an accepted request's admission, on the cores the engine decodes on.
This pure-ASGI middleware decides from the request head alone, before the body is read: when
:meth:`AdmissionControl.refusal` says one more sequence may not enter (count limit: 429;
queue-time bound: 503), it answers with a body encoded once at import and a ``Retry-After``
header, and the body is never parsed (uvicorn still reads and discards it, so the connection
stays usable). A request with several sequences (``n``, prompt lists) is checked again for its
full count by :meth:`EngineClient.admit` once parsed.

A request let through gets :data:`ARRIVAL` set to now, so the later admission check and the
oldest-wait rule count the time it spends being parsed and tokenized against the bound.
"""

from __future__ import annotations

import json
import time
from typing import Any

from plait.server.admission import ARRIVAL
from plait.server.protocol import error_body

#: the routes whose requests take a place in the engine
GATED_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})

_MESSAGES = {
    429: "too many requests in flight (--max-running-requests + --max-queued-requests); "
    "retry after the seconds in the Retry-After header",
    503: "the server is overloaded: a new request would wait longer than the queue-time "
    "bound (--max-queue-time) before it runs; retry after the seconds in the Retry-After header",
}
_DRAINING = "the server is shutting down"


def _encoded(message: str, status: int) -> bytes:
    return json.dumps(error_body(message, status)).encode()


#: the refusal bodies, encoded once: a refusal costs no JSON encoding
BODIES = {status: _encoded(message, status) for status, message in _MESSAGES.items()}
DRAINING_BODY = _encoded(_DRAINING, 503)


class AdmissionGateMiddleware:
    """Refuse a generation request from its head when admission is full; otherwise stamp its
    arrival (:data:`ARRIVAL`) and pass it on. Needs ``app.state.client`` (an
    ``EngineClient``); before the server has one, requests pass untouched."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GATED_PATHS:
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        client = getattr(scope["app"].state, "client", None) if "app" in scope else None
        if client is not None:
            if client.draining:
                await _answer(send, 503, DRAINING_BODY, None)
                return
            refusal = client.admission.refusal(1)
            if refusal is not None:
                client.metrics.refused.labels(str(refusal.status)).inc()
                await _answer(send, refusal.status, BODIES[refusal.status], refusal.retry_after)
                return
        token = ARRIVAL.set(arrived)
        try:
            await self.app(scope, receive, send)
        finally:
            ARRIVAL.reset(token)


async def _answer(send: Any, status: int, body: bytes, retry_after: int | None) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
