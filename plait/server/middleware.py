"""The server's ASGI middleware, outermost first in a request's path: the API key check, the
body guard (size limit, lone surrogates), and the JSON body check. Pure ASGI classes, not
``BaseHTTPMiddleware``, so streaming and disconnect detection pass through untouched."""

from __future__ import annotations

import hmac
import json
import re
from typing import Any

from fastapi.responses import JSONResponse

from plait.server.protocol import APIError, error_body

# Reachable without the API key: liveness probes and scrapers should not hold secrets.
_OPEN_PATHS = {"/health", "/metrics"}


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so streaming and disconnect detection pass through
    untouched."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in _OPEN_PATHS
            and scope["method"] != "OPTIONS"
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            # The auth scheme is case-insensitive (RFC 9110 11.1): "bearer KEY" is fine.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                response = JSONResponse(
                    error_body("invalid or missing API key", 401),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JSONBodyMiddleware:
    """Every request body here is JSON; ``curl -d`` labels it as a form (or not at all), so
    such bodies are relabelled rather than rejected."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            ctype = dict(scope["headers"]).get(b"content-type", b"")
            if not ctype or ctype.startswith(b"application/x-www-form-urlencoded"):
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class BodyGuardMiddleware:
    """Bounded, encodable request bodies, before any route parses them: a body over
    ``max_bytes`` is a 413 (Content-Length is checked first, then the bytes as they arrive),
    and a JSON string holding a lone UTF-16 surrogate (``"\\ud800"``, which no tokenizer or
    response encoder accepts) is a 400 naming the field."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, self._too_large())
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, self._too_large())
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        bad = find_lone_surrogate(body)
        if bad is not None:
            await self._refuse(
                scope,
                receive,
                send,
                APIError(
                    f"{bad or 'body'} holds a lone UTF-16 surrogate, which is not valid text",
                    param=bad or None,
                ),
            )
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(
            f"the request body exceeds {self.max_bytes} bytes (--max-request-body-bytes)",
            status=413,
        )

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, e: APIError) -> None:
        await JSONResponse(e.body(), status_code=e.status)(scope, receive, send)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def find_lone_surrogate(body: bytes) -> str | None:
    """The dotted path of the first string in a JSON ``body`` that holds a lone surrogate ("" for
    the top level), or None. Cheap for ordinary bodies: it parses only when an escape of the
    surrogate range appears at all."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None  # not JSON: the route reports that

    def walk(value: Any, path: str) -> str | None:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                found = walk(k, path) if isinstance(k, str) else None
                found = found if found is not None else walk(v, f"{path}.{k}" if path else k)
                if found is not None:
                    return found
        elif isinstance(value, list):
            for v in value:
                found = walk(v, path)
                if found is not None:
                    return found
        return None

    return walk(doc, "")
