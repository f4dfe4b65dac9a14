"""Between SGLang's scheduler protocol and Plait's core messages.

Requests: a ``GenerateRequest`` becomes a :class:`GenerateReq` checked by the same core rules
as an HTTP request (``GenerateReq.validate`` against the engine's limits, the grammar syntax
check), so a bad request is refused with the same message, as ``INVALID_ARGUMENT``. Fields
Plait cannot honour (multimodal inputs, hidden states, LoRA, custom logit processors, another
DP rank, ...) are refused by name, never dropped.

Responses follow SGLang's servicer: a stream sends a chunk with each output's new tokens and,
when the request finishes, that last chunk and then a ``GenerateComplete``; a non-streamed
request gets one ``GenerateComplete`` with every output token. Counts are cumulative.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from plait.core.messages import Bootstrap, GenerateReq
from plait.server.protocol import APIError

# HTTP status of an APIError -> the gRPC code the gateway maps back (SGLang's servicer uses
# the same pairs: a 400 is the caller's fault and is not retried; UNAVAILABLE is).
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(e: APIError) -> grpc.StatusCode:
    return _CODES.get(e.status, grpc.StatusCode.INTERNAL)


def retry_metadata(e: APIError) -> tuple[tuple[str, str], ...]:
    """An admission refusal's ``Retry-After`` as gRPC trailing metadata (``retry-after``,
    seconds), so a gRPC client gets the same hint as an HTTP one; empty for other errors."""
    retry = (e.headers or {}).get("Retry-After")
    return () if retry is None else (("retry-after", retry),)


def error_message(e: APIError) -> str:
    """The message, led by the parameter when the core's message does not already name it."""
    if e.param and e.param.rsplit(".", 1)[-1] not in e.message:
        return f"{e.param}: {e.message}"
    return e.message


def _refuse(name: str, why: str = "is not supported by Plait workers") -> None:
    raise APIError(f"{name} {why}", param=name)


def sampling_params(sp: pb.SamplingParams) -> dict[str, Any]:
    """Proto sampling parameters -> the core's dict. proto3 cannot tell an unset scalar from
    its zero: as in SGLang's servicer, a zero ``top_p``, ``top_k`` or ``repetition_penalty``
    (never meant: an empty candidate set, an infinite penalty) means the neutral value, and
    ``n`` 0 means 1. ``temperature`` 0 is greedy, as sent."""
    if sp.HasField("structural_tag"):
        _refuse("sampling_params.structural_tag")
    if sp.HasField("stream_interval") and sp.stream_interval > 1:
        _refuse("sampling_params.stream_interval", "above 1 is not supported by Plait workers")
    if sp.HasField("custom_params") and MessageToDict(sp.custom_params):
        _refuse("sampling_params.custom_params")
    out: dict[str, Any] = {
        "temperature": sp.temperature,
        "top_p": sp.top_p if sp.top_p != 0.0 else 1.0,
        "top_k": sp.top_k if sp.top_k != 0 else -1,
        "min_p": sp.min_p,
        "frequency_penalty": sp.frequency_penalty,
        "presence_penalty": sp.presence_penalty,
        "repetition_penalty": sp.repetition_penalty if sp.repetition_penalty != 0.0 else 1.0,
        "min_new_tokens": sp.min_new_tokens,
        "stop": list(sp.stop),
        "stop_token_ids": list(sp.stop_token_ids),
        "skip_special_tokens": sp.skip_special_tokens,
        "spaces_between_special_tokens": sp.spaces_between_special_tokens,
        "no_stop_trim": sp.no_stop_trim,
        "ignore_eos": sp.ignore_eos,
        "n": sp.n or 1,
    }
    if sp.HasField("max_new_tokens"):
        out["max_new_tokens"] = sp.max_new_tokens
    for field, key in (
        ("regex", "regex"),
        ("json_schema", "json_schema"),
        ("ebnf_grammar", "ebnf"),
    ):
        if sp.HasField(field):
            out[key] = getattr(sp, field)
    if sp.logit_bias:
        out["logit_bias"] = dict(sp.logit_bias)
    return out


def _check_supported(req: pb.GenerateRequest) -> None:
    if not req.HasField("tokenized") or not req.tokenized.input_ids:
        raise APIError("tokenized.input_ids must hold the prompt's token ids", param="input_ids")
    mm = req.mm_inputs
    if req.HasField("mm_inputs") and (
        mm.image_urls or mm.video_urls or mm.audio_urls or mm.image_data or mm.video_data
        or mm.audio_data or mm.HasField("pixel_values") or mm.model_specific_tensors
    ):  # fmt: skip
        _refuse("mm_inputs", "(images, video, audio) are not supported by Plait workers")
    if req.return_hidden_states:
        _refuse("return_hidden_states")
    if req.token_ids_logprob:
        _refuse("token_ids_logprob")
    if req.input_embeds:
        _refuse("input_embeds")
    if req.lora_id:
        _refuse("lora_id", "is not supported by Plait's gRPC workers")
    if req.custom_logit_processor:
        _refuse("custom_logit_processor")
    if req.HasField("data_parallel_rank") and req.data_parallel_rank != 0:
        raise APIError(
            f"data_parallel_rank must be 0 (a Plait worker is one rank), "
            f"got {req.data_parallel_rank}",
            param="data_parallel_rank",
        )


def generate_req(req: pb.GenerateRequest) -> GenerateReq:
    """The request as one core message (``n`` samples of one prompt), not yet checked against
    the engine's limits (``GenerateReq.validate``). Raises :class:`APIError` (400) naming the
    field, or ``ValueError`` from the core's constructors."""
    _check_supported(req)
    bootstrap = None
    if req.HasField("disaggregated_params") and req.disaggregated_params.bootstrap_host:
        d = req.disaggregated_params
        bootstrap = Bootstrap(host=d.bootstrap_host, port=d.bootstrap_port, room=d.bootstrap_room)
    return GenerateReq(
        input_ids=list(req.tokenized.input_ids),
        sampling_params=sampling_params(req.sampling_params),
        rid=req.request_id or None,
        return_logprob=req.return_logprob,
        logprob_start_len=req.logprob_start_len if req.return_logprob else -1,
        top_logprobs_num=req.top_logprobs_num,
        stream=req.stream,
        bootstrap=bootstrap,
    )


# ---------------------------------------------------------------------------- responses
def _top(rows: list | None) -> list[pb.TopLogProbs]:
    return [
        pb.TopLogProbs(values=[e[0] for e in pos or []], token_ids=[e[1] for e in pos or []])
        for pos in rows or []
    ]


def output_logprobs(meta: dict[str, Any], start: int) -> pb.OutputLogProbs | None:
    """Output logprobs from position ``start`` on (0 for all of them)."""
    rows = meta.get("output_token_logprobs")
    if rows is None:
        return None
    tops = meta.get("output_top_logprobs") or []
    return pb.OutputLogProbs(
        token_logprobs=[r[0] for r in rows[start:]],
        token_ids=[r[1] for r in rows[start:]],
        top_logprobs=_top(tops[start:]) if any(t for t in tops) else [],
    )


def input_logprobs(meta: dict[str, Any]) -> pb.InputLogProbs | None:
    rows = meta.get("input_token_logprobs")
    if rows is None:
        return None
    tops = meta.get("input_top_logprobs") or []
    return pb.InputLogProbs(
        token_logprobs=[
            pb.InputTokenLogProb() if r[0] is None else pb.InputTokenLogProb(value=r[0])
            for r in rows
        ],
        token_ids=[r[1] for r in rows],
        top_logprobs=_top(tops) if any(t for t in tops) else [],
    )


def _counts(meta: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": meta.get("prompt_tokens", 0),
        "completion_tokens": meta.get("completion_tokens", 0),
        "cached_tokens": meta.get("cached_tokens", 0),
    }


def chunk(rid: str, out: dict[str, Any], sent: int, index: int) -> pb.GenerateResponse:
    """The tokens of ``out`` after the first ``sent`` ones; input logprobs only in the first
    chunk."""
    meta = out.get("meta_info") or {}
    return pb.GenerateResponse(
        request_id=rid,
        chunk=pb.GenerateStreamChunk(
            token_ids=list(out.get("output_ids") or [])[sent:],
            output_logprobs=output_logprobs(meta, sent),
            input_logprobs=input_logprobs(meta) if sent == 0 else None,
            index=index,
            **_counts(meta),
        ),
    )


def complete(rid: str, out: dict[str, Any], sent: int, index: int) -> pb.GenerateResponse:
    """The finished request: its tokens after ``sent`` (0 when not streamed: all of them, as
    SGLang's servicer sends), the finish reason and the matched stop."""
    meta = out.get("meta_info") or {}
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    matched = reason.get("matched") if isinstance(reason, dict) else None
    stop: dict[str, Any] = {}
    if isinstance(matched, int):
        stop["matched_token_id"] = matched
    elif isinstance(matched, str):
        stop["matched_stop_str"] = matched
    return pb.GenerateResponse(
        request_id=rid,
        complete=pb.GenerateComplete(
            output_ids=list(out.get("output_ids") or [])[sent:],
            finish_reason=kind if kind in ("length", "abort") else "stop",
            output_logprobs=output_logprobs(meta, sent),
            input_logprobs=input_logprobs(meta),
            index=index,
            **_counts(meta),
            **stop,
        ),
    )
