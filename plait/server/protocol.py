"""Request bodies for the HTTP API and the one error shape every route returns.

The models give FastAPI (and so the OpenAPI schema that fuzzers read) the field types; the
semantic checks (ranges, context length, regex syntax) live in the routes and in
``SamplingParams``, and all of them end as ``APIError`` -> HTTP 4xx with an OpenAI-style body:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from plait.core.messages import Bootstrap
from plait.server.tools.protocol import ToolChoice, ToolDef
from plait.server.request_fields import (
    UnsupportedChat,
    UnsupportedCompletion,
    UnsupportedGenerate,
    UnsupportedOpenAI,
    UnsupportedSampling,
    UnsupportedStreamOptions,
)


class APIError(Exception):
    """An error that reaches the client as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.type)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(
    message: str, status: int, param: str | None = None, type: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type or _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": status,
        }
    }


def param_of(err: ValueError) -> str | None:
    """``SamplingParams`` errors start with the field name ("temperature must be >= 0")."""
    head = str(err).split(" ", 1)[0].rstrip(":")
    return head if head.isidentifier() else None


class _Strict(BaseModel):
    # An unknown field is a 400, never silently dropped: a typo should not change sampling.
    # Strict types: "8" is not a max_tokens and true is not a token id.
    model_config = ConfigDict(extra="forbid", strict=True)


# --------------------------------------------------------------------------- SGLang-native
MAX_N = 128  # samples per prompt; more is a denial of service, not a use case
MAX_TOP_LOGPROBS = 20
MAX_SEQUENCES = 256  # prompts x n in one request


class GenerateSamplingParams(UnsupportedSampling, _Strict):
    """``sampling_params`` of ``/generate``: ``SamplingParams``' fields, typed for the schema.
    SGLang's fields Plait does not have are accepted only at their defaults (request_fields),
    since SGLang clients send them as null or []; any other key is a 400."""

    max_new_tokens: int | None = Field(default=None, ge=0)
    min_new_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    seed: int | None = None
    regex: str | None = None
    json_schema: Union[str, dict[str, Any], None] = None
    ebnf: str | None = None
    logit_bias: dict[str, float] | None = None  # token id -> bias; checked by SamplingParams


class GatewayFields(BaseModel):
    """Fields SGLang's gateway (``sglang-router``) and SGLang clients add to every request.

    Honoured: ``data_parallel_rank`` and its new name ``routed_dp_rank`` (a Plait worker is
    one data-parallel rank, rank 0; any other rank is a 400). Refused when asked for, with
    the other fields Plait does not support (request_fields): ``return_hidden_states``,
    ``return_bytes``, ``return_entropy``, ``background``. Accepted and ignored because they
    have no effect on output: ``log_metrics`` and ``no_logs`` (Plait always counts metrics
    and logs no request bodies), and ``model`` on ``/generate`` (a worker serves one model).
    """

    data_parallel_rank: int | None = Field(default=None, ge=0, le=0)
    routed_dp_rank: int | None = Field(default=None, ge=0, le=0)
    log_metrics: bool = True
    no_logs: bool = False
    # Prefill/decode disaggregation: the gateway's pairing of the two halves of a request
    # (plait.disaggregation); a server not in a disaggregation mode refuses them.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = Field(default=None, ge=0)

    def bootstrap(self) -> Bootstrap | None:
        """The three bootstrap fields as one value; some but not all of them is a 400."""
        given = (self.bootstrap_host, self.bootstrap_port, self.bootstrap_room)
        if all(v is None for v in given):
            return None
        if any(v is None for v in given):
            raise APIError(
                "bootstrap_room: bootstrap_host, bootstrap_port and bootstrap_room go together",
                param="bootstrap_room",
            )
        try:
            return Bootstrap(*given)
        except ValueError as e:
            raise APIError(str(e), param=param_of(e)) from None


class GenerateRequest(GatewayFields, UnsupportedGenerate, _Strict):
    """``POST /generate``: SGLang's GenerateReqInput, the fields Plait implements."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["input_ids"]}]},
    )
    text: Union[str, list[str], None] = None
    input_ids: Union[list[int], list[list[int]], None] = None
    sampling_params: Union[GenerateSamplingParams, list[GenerateSamplingParams], None] = None
    return_logprob: Union[bool, list[bool], None] = None
    logprob_start_len: Union[int, list[int], None] = None
    top_logprobs_num: Union[int, list[int], None] = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: Union[str, list[str], None] = None
    model: str | None = None  # see GatewayFields


class AbortRequest(_Strict):
    rid: str = ""
    abort_all: bool = False


# --------------------------------------------------------------------------- OpenAI
class StreamOptions(UnsupportedStreamOptions, _Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _SamplingFields(GatewayFields, UnsupportedOpenAI, _Strict):
    """Fields shared by completions and chat: OpenAI's plus SGLang's extras."""

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # SGLang extensions (passed as extra_body by the openai SDK)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = None
    no_stop_trim: bool | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    rid: str | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_SamplingFields, UnsupportedCompletion):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, refusal, ... pass to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, UnsupportedChat):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # No effect on the output: end-user identifiers and a cache-routing hint (Plait's prefix
    # cache needs no key).
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    continue_final_message: bool = False
    # With --reasoning-parser: the reasoning as reasoning_content (else left in content), and
    # streamed as it is written (else in one piece once it ends). plait.server.reasoning
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDef] | None = None  # plait.server.tools
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: bool = True
