"""From validated request fields to engine requests, and from engine outputs to responses.

Shared by ``/generate`` and the OpenAI routes, so both APIs reject the same bad input the same
way: every check here raises ``APIError`` (HTTP 400) naming the offending parameter.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import fields
from typing import Any, AsyncIterator

from starlette.requests import Request

from plait.core.sampling_params import SamplingParams
from plait.server.engine_client import EngineClient, EngineRequest
from plait.server.protocol import APIError, param_of


_KNOWN_PARAMS = {f.name for f in fields(SamplingParams)}


class ClientDisconnected(Exception):
    """The HTTP client left before its response was ready; its requests were aborted."""


def sampling_params(raw: dict[str, Any] | None, client: EngineClient,
                    param_prefix: str = "") -> dict[str, Any]:
    """Validate a sampling-params dict. ``None`` means "default", and so does an empty value
    for a key Plait lacks: SGLang clients send every field they know, unset ones as null or
    ``[]`` (``stop_regex``). An unknown key with a real value is still a 400."""
    if raw is not None and not isinstance(raw, dict):
        raise APIError("sampling_params must be an object", param="sampling_params")
    raw = {k: v for k, v in (raw or {}).items()
           if v is not None and (k in _KNOWN_PARAMS or v not in ([], {}, ""))}
    try:
        sp = SamplingParams.from_dict(raw)
        sp.validate(vocab_size=client.vocab_size)
    except (ValueError, TypeError) as e:
        param = param_of(e) if isinstance(e, ValueError) else None
        raise APIError(str(e), param=param_prefix + param if param else None) from None
    if sp.regex is not None:
        try:
            re.compile(sp.regex)
        except re.error as e:
            raise APIError(f"regex is not a valid regular expression: {e}",
                           param=param_prefix + "regex") from None
    if sp.json_schema is not None:
        try:
            schema = json.loads(sp.json_schema)
        except json.JSONDecodeError as e:
            raise APIError(f"json_schema is not valid JSON: {e}",
                           param=param_prefix + "json_schema") from None
        if not isinstance(schema, (dict, bool)):
            raise APIError("json_schema must be a JSON object",
                           param=param_prefix + "json_schema")
    return sp.to_dict()


def check_text_length(client: EngineClient, chars: int, param: str) -> None:
    """Refuse text that cannot fit the context before spending time tokenizing it: no token is
    longer than ``client.max_token_chars`` characters, so the token count is at least
    ``chars / max_token_chars``."""
    ctx = client.context_length
    if ctx and chars > ctx * client.max_token_chars:
        raise APIError(f"{param} is {chars} characters, which cannot fit the context length "
                       f"of {ctx} tokens", param=param)


async def tokenize(client: EngineClient, text: str, add_special_tokens: bool = True,
                   param: str = "prompt") -> list[int]:
    """Token ids of ``text``, computed off the event loop (a long prompt takes seconds)."""
    check_text_length(client, len(text), param)
    return await asyncio.to_thread(client.tokenizer.encode, text,
                                   add_special_tokens=add_special_tokens)


def check_input_ids(client: EngineClient, ids: list[int], param: str) -> None:
    if not ids:
        raise APIError(f"{param} must not be empty", param=param)
    vocab = client.vocab_size
    if any(not isinstance(t, int) or t < 0 or (vocab and t >= vocab) for t in ids):
        raise APIError(f"{param} holds a token id outside [0, {vocab})", param=param)


def check_length(client: EngineClient, prompt_len: int, max_new_tokens: int,
                 param: str = "max_new_tokens") -> None:
    """The prompt plus the generation must fit the model's context window."""
    ctx = client.context_length
    if not ctx:
        return
    if prompt_len >= ctx:
        raise APIError(f"the prompt is {prompt_len} tokens; the model's context length is "
                       f"{ctx}", param="prompt", type="invalid_request_error")
    if prompt_len + max_new_tokens > ctx:
        raise APIError(f"{param} ({max_new_tokens}) plus the prompt ({prompt_len} tokens) "
                       f"exceeds the context length {ctx}", param=param)


def expand_n(req: EngineRequest) -> list[EngineRequest]:
    """n > 1 becomes n independent requests (each n=1). A fixed seed is offset per sample so
    the n samples differ but the whole request stays reproducible."""
    n = req.sampling_params.get("n", 1)
    if n == 1:
        return [req]
    out = []
    for i in range(n):
        sp = {**req.sampling_params, "n": 1}
        if sp.get("seed") is not None:
            sp["seed"] = sp["seed"] + i
        out.append(EngineRequest(req.input_ids, sp, f"{req.rid}-{i}", req.return_logprob,
                                 req.logprob_start_len, req.top_logprobs_num, req.stream))
    return out


async def _final(client: EngineClient, req: EngineRequest) -> dict[str, Any]:
    out = None
    async with contextlib.aclosing(client.generate(req)) as gen:
        async for out in gen:
            pass
    return out


async def collect(client: EngineClient, reqs: list[EngineRequest],
                  request: Request | None) -> list[dict[str, Any]]:
    """Run requests to completion concurrently; if the HTTP client disconnects first, every
    one of them is aborted (their KV is freed) and ``ClientDisconnected`` is raised."""
    with client.admit(len(reqs)):
        return await _collect(client, reqs, request)


async def _collect(client: EngineClient, reqs: list[EngineRequest],
                   request: Request | None) -> list[dict[str, Any]]:
    tasks = [asyncio.create_task(_final(client, r)) for r in reqs]
    gathered = asyncio.gather(*tasks)
    listener = asyncio.create_task(_wait_disconnect(request)) if request is not None else None
    try:
        if listener is None:
            return await gathered
        done, _ = await asyncio.wait({gathered, listener},
                                     return_when=asyncio.FIRST_COMPLETED)
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


async def merge_streams(client: EngineClient, reqs: list[EngineRequest]
                        ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Interleave the cumulative outputs of several requests as (index, output). Closing the
    iterator (client gone) aborts whatever is still running."""
    with client.admit(len(reqs)):
        async for item in _merge_streams(client, reqs):
            yield item


async def _merge_streams(client: EngineClient, reqs: list[EngineRequest]
                         ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, req: EngineRequest) -> None:
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


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


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
