"""SGLang-native ``POST /generate``: what ``sglang.RuntimeEndpoint`` (gen, select, fork,
prefix caching with ``max_new_tokens: 0``) speaks.

One prompt in -> one object out; a list of prompts (or n > 1) -> a list out, prompt-major.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from plait.server.engine_client import EngineClient, EngineRequest
from plait.server.protocol import MAX_TOP_LOGPROBS, APIError, GenerateRequest
from plait.server.submit import (SSE_DONE, check_input_ids, check_length, check_text_length,
                                 collect, expand_n, merge_streams, sampling_params, sse,
                                 tokenize)

router = APIRouter()

_LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs")
_TOP_KEYS = ("input_top_logprobs", "output_top_logprobs")


def _per_item(value: Any, count: int, name: str, default: Any) -> list[Any]:
    """A scalar applies to every prompt; a list must have one entry per prompt."""
    if value is None:
        return [default] * count
    if isinstance(value, list):
        if len(value) != count:
            raise APIError(f"{name} has {len(value)} entries for {count} prompts", param=name)
        return [default if v is None else v for v in value]
    return [value] * count


async def _prompts(body: GenerateRequest, client: EngineClient
                   ) -> tuple[list[list[int]], bool]:
    """Token ids of every prompt, and whether the request was a batch."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError("exactly one of text or input_ids is required", param="text")
    if body.text is not None:
        batched = isinstance(body.text, list)
        texts = body.text if batched else [body.text]
        if not texts:
            raise APIError("text must not be an empty list", param="text")
        check_text_length(client, sum(map(len, texts)), "text")
        prompts = [await tokenize(client, t, param="text") for t in texts]
        for p in prompts:
            if not p:
                raise APIError("text must not be empty", param="text")
        return prompts, batched
    ids = body.input_ids
    batched = bool(ids) and isinstance(ids[0], list)
    prompts = ids if batched else [ids]
    for p in prompts:
        check_input_ids(client, p, "input_ids")
    return prompts, batched


async def build_requests(body: GenerateRequest, client: EngineClient
                         ) -> tuple[list[EngineRequest], bool]:
    """Validate everything up front: a request either fails here with a 400 or is submitted."""
    prompts, batched = await _prompts(body, client)
    count = len(prompts)
    sps = _per_item(body.sampling_params, count, "sampling_params", None)
    sps = [sp.model_dump(exclude_unset=True) if sp is not None else {} for sp in sps]
    want_lp = _per_item(body.return_logprob, count, "return_logprob", False)
    starts = _per_item(body.logprob_start_len, count, "logprob_start_len", -1)
    tops = _per_item(body.top_logprobs_num, count, "top_logprobs_num", 0)
    rids = _per_item(body.rid, count, "rid", None)
    if isinstance(body.rid, str) and count > 1:
        rids = [f"{body.rid}-{i}" for i in range(count)]
    reqs: list[EngineRequest] = []
    for i, ids in enumerate(prompts):
        sp = sampling_params(sps[i], client)
        check_length(client, len(ids), sp["max_new_tokens"])
        if not isinstance(starts[i], int) or not -1 <= starts[i] <= len(ids):
            raise APIError(f"logprob_start_len must be in [-1, {len(ids)}]",
                           param="logprob_start_len")
        if not isinstance(tops[i], int) or not 0 <= tops[i] <= MAX_TOP_LOGPROBS:
            raise APIError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]",
                           param="top_logprobs_num")
        req = EngineRequest(ids, sp, rids[i] or uuid.uuid4().hex, bool(want_lp[i]),
                            starts[i], tops[i], body.stream)
        reqs.extend(expand_n(req))
    return reqs, batched or len(reqs) > 1


def format_output(client: EngineClient, out: dict[str, Any], rid: str, with_text: bool,
                  started: float) -> dict[str, Any]:
    """Engine output -> SGLang's response object; logprob tuples become [logprob, id, text]."""
    meta = dict(out.get("meta_info") or {})
    meta["id"] = rid
    meta["e2e_latency"] = time.monotonic() - started
    for key in _LOGPROB_KEYS:
        if key in meta and meta[key] is not None:
            meta[key] = _with_text(client, meta[key], with_text)
    for key in _TOP_KEYS:
        if key in meta and meta[key] is not None:
            meta[key] = [None if pos is None else _with_text(client, pos, with_text)
                         for pos in meta[key]]
    return {"text": out.get("text", ""), "output_ids": list(out.get("output_ids") or []),
            "meta_info": meta}


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


async def _streaming_response(client: EngineClient, reqs: list[EngineRequest], batched: bool,
                              with_text: bool, started: float) -> StreamingResponse:
    stream = merge_streams(client, reqs)
    # Wait for the first output before answering, so an error the engine raises on
    # submission is still a plain HTTP error rather than an event inside a 200 stream.
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def events() -> AsyncIterator[str]:
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

    return StreamingResponse(events(), media_type="text/event-stream")
