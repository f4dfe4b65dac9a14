"""SGLang-native ``POST /generate``: what ``sglang.RuntimeEndpoint`` (gen, select, fork,
prefix caching with ``max_new_tokens: 0``) speaks.

One prompt in -> one object out; a list of prompts (or n > 1) -> a list out, prompt-major.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from plait.core.messages import GenerateReq
from plait.server.engine_client import EngineClient
from plait.server.protocol import APIError, GatewayFields, GenerateRequest
from plait.server.sse import SSE_DONE, SSEResponse, sse
from plait.server.submit import (
    clean_sampling_params,
    collect,
    invalid_request,
    merge_streams,
    prepare,
)

router = APIRouter()

_LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs")
_TOP_KEYS = ("input_top_logprobs", "output_top_logprobs")


# Fields of the body that are not the request's own: how the response is rendered and what
# the gateway adds (checked by the body model; see GatewayFields). Unsupported fields
# (request_fields) are never dumped.
_RESPONSE_ONLY = {"return_text_in_logprobs", "model"} | set(GatewayFields.model_fields)


async def build_requests(
    body: GenerateRequest, client: EngineClient
) -> tuple[list[GenerateReq], bool]:
    """The body as core messages, one per sample, all checked before any is submitted: a
    request either fails here with a 400 or runs whole. Tokenizing runs off the event loop."""
    values = body.model_dump(exclude=_RESPONSE_ONLY, exclude_none=True)
    sps = values.get("sampling_params")
    values["sampling_params"] = (
        [clean_sampling_params(sp) for sp in sps]
        if isinstance(sps, list)
        else clean_sampling_params(sps)
    )
    values["bootstrap"] = body.bootstrap()
    with invalid_request():
        msgs, batched = GenerateReq.batch(**values)
        reqs = await prepare(client, msgs)
    return reqs, batched or len(reqs) > 1


def format_output(
    client: EngineClient, out: dict[str, Any], rid: str, with_text: bool, started: float
) -> dict[str, Any]:
    """Engine output -> SGLang's response object; logprob tuples become [logprob, id, text]."""
    meta = dict(out.get("meta_info") or {})
    meta["id"] = rid
    meta["e2e_latency"] = time.monotonic() - started
    for key in _LOGPROB_KEYS:
        if key in meta and meta[key] is not None:
            meta[key] = _with_text(client, meta[key], with_text)
    for key in _TOP_KEYS:
        if key in meta and meta[key] is not None:
            meta[key] = [
                None if pos is None else _with_text(client, pos, with_text) for pos in meta[key]
            ]
    return {
        "text": out.get("text", ""),
        "output_ids": list(out.get("output_ids") or []),
        "meta_info": meta,
    }


def _with_text(client: EngineClient, entries: list, with_text: bool) -> list[list[Any]]:
    rows = [list(e) for e in entries]
    if with_text and rows:
        texts = client.tokenizer.batch_decode([[r[1]] for r in rows])
        for r, t in zip(rows, texts):
            r[2:] = [t]
    else:
        for r in rows:
            r[2:] = [None]
    return rows


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    client: EngineClient = request.app.state.client
    started = time.monotonic()
    reqs, batched = await build_requests(body, client)
    with_text = body.return_text_in_logprobs
    if body.stream:
        return await _streaming_response(client, reqs, batched, with_text, started)
    outs = await collect(client, reqs, request)
    results = [format_output(client, o, r.rid, with_text, started) for r, o in zip(reqs, outs)]
    return results if batched else results[0]


async def _streaming_response(
    client: EngineClient, reqs: list[GenerateReq], batched: bool, with_text: bool, started: float
) -> SSEResponse:
    stream = merge_streams(client, reqs)
    # Wait for the first output before answering, so an error the engine raises on
    # submission is still a plain HTTP error rather than an event inside a 200 stream.
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            item: tuple[int, dict[str, Any]] | None = first
            while item is not None:
                i, out = item
                obj = format_output(client, out, reqs[i].rid, with_text, started)
                if batched:
                    obj["index"] = i
                yield sse(obj)
                item = await anext(stream, None)
        except APIError as e:
            yield sse(e.body())
        finally:
            await stream.aclose()
        yield SSE_DONE

    return SSEResponse(events())
