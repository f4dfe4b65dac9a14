"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, and (from
:mod:`plait.server.openai_chat`) ``/v1/chat/completions``.

Both generation routes reduce to the same steps (:mod:`plait.server.openai_common`): prompts
-> token ids, OpenAI fields -> validated SGLang sampling params, n expanded into engine
requests (choice index = prompt * n + sample), then either one JSON body or an SSE stream
ending ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from plait.server.engine_client import EngineClient
from plait.server.openai_common import (
    check_model,
    check_stream_options,
    client_of,
    engine_requests,
    response_format_schema,
    sampling_params_of,
    stream_response,
    token_texts,
    usage_of,
)
from plait.server.protocol import APIError, CompletionRequest
from plait.server.submit import collect, finish_reason_str

router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    c = client_of(request)
    return {
        "object": "list",
        "data": [
            {
                "id": c.model_name,
                "object": "model",
                "created": int(c.started_at),
                "owned_by": "plait",
                "root": c.model_path,
                "max_model_len": c.context_length,
            }
        ],
    }


# --------------------------------------------------------------------------- completions
def _prompt_field(prompt: Any) -> dict[str, Any]:
    """OpenAI's ``prompt`` (text, token ids, or a list of either) as the core's field."""
    ids = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)
    return {"input_ids" if ids else "text": prompt}


def _completion_logprobs(
    client: EngineClient, meta: dict[str, Any], echo: bool, offset: int
) -> dict[str, Any]:
    entries = (meta.get("input_token_logprobs") or [] if echo else []) + (
        meta.get("output_token_logprobs") or []
    )
    tops = (meta.get("input_top_logprobs") or [] if echo else []) + (
        meta.get("output_top_logprobs") or []
    )
    texts = token_texts(client, entries)
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    top_out = []
    for i in range(len(entries)):
        row = tops[i] if i < len(tops) else None
        top_out.append(None if not row else {client.tokenizer.decode([e[1]]): e[0] for e in row})
    return {
        "tokens": texts,
        "token_logprobs": [e[0] for e in entries],
        "top_logprobs": top_out,
        "text_offset": offsets,
    }


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    client = client_of(request)
    check_model(client, body.model)
    check_stream_options(body)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError("best_of must equal n (no server-side ranking)", param="best_of")
    if body.echo and body.stream:
        raise APIError("echo is not supported with stream", param="echo")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    want_lp = body.logprobs is not None
    rid, created = body.rid or f"cmpl-{uuid.uuid4().hex}", int(time.time())
    schema = response_format_schema(body)
    sp = sampling_params_of(body, max_tokens, **({"json_schema": schema} if schema else {}))
    reqs = await engine_requests(
        client,
        {},
        **_prompt_field(body.prompt),
        sampling_params=sp,
        rid=rid,
        return_logprob=want_lp,
        top_logprobs_num=body.logprobs or 0,
        logprob_start_len=0 if body.echo and want_lp else -1,
        stream=body.stream,
        bootstrap=body.bootstrap(),
    )
    prompt_texts = (
        [client.tokenizer.decode(r.input_ids) for r in reqs[:: body.n]] if body.echo else None
    )

    def choice(i: int, out: dict[str, Any], text: str, offset: int) -> dict[str, Any]:
        meta = out.get("meta_info") or {}
        return {
            "index": i,
            "text": text,
            "logprobs": _completion_logprobs(client, meta, body.echo, offset) if want_lp else None,
            "finish_reason": finish_reason_str(meta),
        }

    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    if body.stream:
        return await stream_response(
            client, reqs, head, body, _completion_chunker(client, head, want_lp)
        )
    outs = await collect(client, reqs, request)
    choices = []
    for i, out in enumerate(outs):
        prefix = prompt_texts[i // body.n] if prompt_texts else ""
        choices.append(choice(i, out, prefix + out.get("text", ""), 0))
    return {
        **head,
        "choices": choices,
        "usage": usage_of(reqs, [o.get("meta_info") or {} for o in outs], body.n),
    }


def _completion_chunker(client: EngineClient, head: dict[str, Any], want_lp: bool):
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}

    def chunk(i: int, out: dict[str, Any]) -> dict[str, Any] | None:
        meta = out.get("meta_info") or {}
        text = out.get("text", "")
        delta = text[sent_text.get(i, 0) :]
        sent_text[i] = max(sent_text.get(i, 0), len(text))
        lp = None
        if want_lp:
            entries = meta.get("output_token_logprobs") or []
            start = sent_tokens.get(i, 0)
            sent_tokens[i] = len(entries)
            lp = _completion_logprobs(
                client,
                {
                    "output_token_logprobs": entries[start:],
                    "output_top_logprobs": (meta.get("output_top_logprobs") or [])[start:],
                },
                False,
                sent_text[i] - len(delta),
            )
        fr = finish_reason_str(meta)
        if not delta and fr is None:
            return None
        return {
            **head,
            "choices": [{"index": i, "text": delta, "logprobs": lp, "finish_reason": fr}],
        }

    return chunk
