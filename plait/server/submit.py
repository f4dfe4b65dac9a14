"""From request bodies to core messages, and from engine outputs to responses.

Shared by ``/generate`` and the OpenAI routes. The rules a request must satisfy are the core's
(``plait.core.messages``); this module only runs them and turns their ``ValueError`` into an
``APIError`` (HTTP 400) naming the offending parameter, so both APIs reject the same bad input
the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import fields
from typing import Any, AsyncIterator, Callable, Iterator

from starlette.requests import Request

from plait.core.messages import GenerateReq, RequestLimits, check_rooms, check_sequences
from plait.core.sampling_params import SamplingParams
from plait.server.engine_client import EngineClient
from plait.server.protocol import APIError, param_of


_KNOWN_PARAMS = {f.name for f in fields(SamplingParams)}


class ClientDisconnected(Exception):
    """The HTTP client left before its response was ready; its requests were aborted."""


def clean_sampling_params(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Drop what SGLang clients send for "unset": they send every field they know, unset ones
    as null or ``[]`` (``stop_regex``). An unknown key with a real value stays, so the core
    still refuses it."""
    if raw is not None and not isinstance(raw, dict):
        raise APIError("sampling_params must be an object", param="sampling_params")
    return {
        k: v
        for k, v in (raw or {}).items()
        if v is not None and (k in _KNOWN_PARAMS or v not in ([], {}, ""))
    }


@contextlib.contextmanager
def invalid_request(rename: dict[str, str] | None = None) -> Iterator[None]:
    """Turn the core's ``ValueError`` (whose message starts with the parameter) into a 400
    naming it; ``rename`` maps the core's names to the route's (``max_new_tokens`` ->
    ``max_tokens``), in the message too."""
    try:
        yield
    except ValueError as e:
        message, param = str(e), param_of(e)
        for ours, theirs in (rename or {}).items():
            message = re.sub(rf"\b{ours}\b", theirs, message)
        raise APIError(message, param=(rename or {}).get(param, param)) from None


def check_text_length(client: EngineClient, chars: int, param: str) -> None:
    """Refuse text that cannot fit the context before spending time tokenizing it: no token is
    longer than ``client.max_token_chars`` characters, so the token count is at least
    ``chars / max_token_chars``. Raises ``ValueError`` naming ``param`` (wrap in
    :func:`invalid_request`), like the core's rules."""
    ctx = client.context_length
    if ctx and chars > ctx * client.max_token_chars:
        raise ValueError(
            f"{param} is {chars} characters, which cannot fit the context length of {ctx} tokens"
        )


async def tokenize(
    client: EngineClient, text: str, add_special_tokens: bool = True, param: str = "prompt"
) -> list[int]:
    """Token ids of ``text``, computed off the event loop (a long prompt takes seconds), after
    the length precheck (``ValueError`` naming ``param``)."""
    check_text_length(client, len(text), param)
    return await asyncio.to_thread(
        client.tokenizer.encode, text, add_special_tokens=add_special_tokens
    )


async def prepare(client: EngineClient, msgs: list[GenerateReq]) -> list[GenerateReq]:
    """What the HTTP layer sends: the messages of one request checked against the engine's
    limits (``client.limits``) by the core's rules, tokenized, and expanded into one message
    per sample. Raises ``ValueError`` naming the parameter (wrap in :func:`invalid_request`).

    The cheap checks come first, on the event loop: the number of sequences (prompts x n)
    and the text-length precheck, so an impossible request is refused without tokenizing it.
    Tokenizing, the core's checks and the grammar syntax check then run in a worker thread."""
    limits = client.limits
    check_sequences(msgs, limits)
    check_rooms(msgs)
    check_text_length(client, sum(len(m.text) for m in msgs if isinstance(m.text, str)), "text")
    return await asyncio.to_thread(_prepare, client.tokenizer.encode, limits, msgs)


def _prepare(
    encode: Callable[[str], list[int]], limits: RequestLimits, msgs: list[GenerateReq]
) -> list[GenerateReq]:
    out: list[GenerateReq] = []
    for msg in msgs:
        msg = msg.tokenized(encode)
        msg.validate(limits)
        msg.sampling_params.check_grammar_syntax()
        out.extend(msg.expand())
    return out


async def _final(client: EngineClient, req: GenerateReq) -> dict[str, Any]:
    out = None
    async with contextlib.aclosing(client.generate(req)) as gen:
        async for out in gen:  # noqa: B007 - the last one is the result
            pass
    return out


async def collect(
    client: EngineClient, reqs: list[GenerateReq], request: Request | None
) -> list[dict[str, Any]]:
    """Run requests to completion concurrently; if the HTTP client disconnects first, every
    one of them is aborted (their KV is freed) and ``ClientDisconnected`` is raised."""
    with client.admit(len(reqs)):
        return await _collect(client, reqs, request)


async def _collect(
    client: EngineClient, reqs: list[GenerateReq], request: Request | None
) -> list[dict[str, Any]]:
    tasks = [asyncio.create_task(_final(client, r)) for r in reqs]
    gathered = asyncio.gather(*tasks)
    listener = asyncio.create_task(_wait_disconnect(request)) if request is not None else None
    try:
        if listener is None:
            return await gathered
        done, _ = await asyncio.wait({gathered, listener}, return_when=asyncio.FIRST_COMPLETED)
        if gathered in done:
            return gathered.result()
        raise ClientDisconnected()
    finally:
        if listener is not None:
            listener.cancel()
        for t in tasks:
            t.cancel()
        if not gathered.done():
            gathered.cancel()
            with contextlib.suppress(BaseException):
                await gathered


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merge_streams(
    client: EngineClient, reqs: list[GenerateReq]
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Interleave the cumulative outputs of several requests as (index, output). Closing the
    iterator (client gone) aborts whatever is still running."""
    with client.admit(len(reqs)):
        async for item in _merge_streams(client, reqs):
            yield item


async def _merge_streams(
    client: EngineClient, reqs: list[GenerateReq]
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    if len(reqs) == 1:  # no pump task and queue between the request and its consumer
        async with contextlib.aclosing(client.generate(reqs[0])) as gen:
            async for out in gen:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, req: GenerateReq) -> None:
        try:
            async with contextlib.aclosing(client.generate(req)) as gen:
                async for out in gen:
                    await queue.put((i, out, None))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            await queue.put((i, None, e))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await queue.put((i, None, StopAsyncIteration()))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    remaining = len(tasks)
    try:
        while remaining:
            i, out, err = await queue.get()
            if isinstance(err, StopAsyncIteration):
                remaining -= 1
            elif err is not None:
                raise err
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def token_text(client: EngineClient, token_id: int) -> str:
    return client.tokenizer.decode([token_id])


def finish_reason_str(meta: dict[str, Any]) -> str | None:
    """OpenAI's finish_reason from the engine's {"type": ...}."""
    fr = meta.get("finish_reason")
    if fr is None:
        return None
    kind = fr.get("type") if isinstance(fr, dict) else str(fr)
    return {"stop": "stop", "length": "length"}.get(kind, kind)


def matched_stop(meta: dict[str, Any]) -> Any:
    fr = meta.get("finish_reason")
    return fr.get("matched") if isinstance(fr, dict) else None
