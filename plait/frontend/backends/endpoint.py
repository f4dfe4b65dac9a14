"""``RuntimeEndpoint``: programs run against a ``plait serve`` (or SGLang) server through
its native ``/generate`` API."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from plait.core.messages import GenerateReq
from plait.core.sampling_params import SamplingParams
from plait.frontend.backends import http
from plait.frontend.backends.native import NativeBackend
from plait.frontend.chat_template import ChatTemplate, chatml, load_tokenizer


class RuntimeEndpoint(NativeBackend):
    """``RuntimeEndpoint("http://127.0.0.1:30000", api_key=None)``.

    The chat template (and the tokenizer that makes ``select`` exact) is loaded from the
    model path the server reports when that path exists locally, else from
    ``tokenizer_path``; failing both, role markers fall back to ChatML.
    """

    def __init__(
        self, base_url: str, api_key: str | None = None, tokenizer_path: str | None = None
    ):
        super().__init__()
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model_info = self._model_info()
        path = (
            tokenizer_path
            or self.model_info.get("tokenizer_path")
            or self.model_info.get("model_path")
        )
        self.tokenizer = load_tokenizer(path) if path else None
        self.chat_template = (
            ChatTemplate.from_tokenizer(self.tokenizer) if self.tokenizer is not None else chatml()
        )
        # SGLang's gateway (sglang-router 0.3.2) takes one text per /generate, not a batch of
        # texts, and refuses the body shape with 422. After the first such refusal this
        # endpoint sends batches as one request per prompt (the prefix cache keeps that cheap).
        self.batches_refused = False

    def _model_info(self) -> dict[str, Any]:
        try:
            return http.get(self.base_url + "/get_model_info", self.api_key)
        except RuntimeError:  # a server without the route still serves /generate
            return {}

    def _call(self, msgs: list[GenerateReq]) -> list[dict[str, Any]]:
        if len(msgs) > 1 and not self.batches_refused:
            try:
                return self._post(msgs)
            except http.HTTPStatusError as e:
                if e.status != 422:  # a worker's own refusal (400, ...) is the caller's error
                    raise
                self.batches_refused = True
        if len(msgs) > 1:
            return [out for m in msgs for out in self._post([m])]
        return self._post(msgs)

    def _post(self, msgs: list[GenerateReq]) -> list[dict[str, Any]]:
        out = http.post(self.base_url + "/generate", generate_body(msgs), self.api_key)
        return out if isinstance(out, list) else [out]

    def _call_stream(self, msg: GenerateReq) -> Iterator[dict[str, Any]]:
        return http.post_sse(self.base_url + "/generate", generate_body([msg]), self.api_key)

    def flush_cache(self) -> Any:
        return http.post(self.base_url + "/flush_cache", {}, self.api_key)

    def get_server_info(self) -> dict[str, Any]:
        return http.get(self.base_url + "/get_server_info", self.api_key)

    def get_model_name(self) -> str:
        """The model path the server reports now (``/get_model_info``), as SGLang answers."""
        return http.get(self.base_url + "/get_model_info", self.api_key)["model_path"]

    def shutdown(self) -> None:
        pass


_PROMPT_KEYS = ("text", "input_ids")
_SAMPLING_DEFAULTS = SamplingParams().to_dict()
_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(GenerateReq)
    if f.default is not dataclasses.MISSING
}


def generate_body(msgs: list[GenerateReq]) -> dict[str, Any]:
    """Messages as one SGLang ``/generate`` body: one prompt as it is, several as a batch
    whose fields are sent once when every prompt agrees, else one value per prompt. Fields at
    their default are left out, so any SGLang server applies its own (equal) default."""
    rows = [_json_fields(m) for m in msgs]
    if len(rows) == 1:
        return rows[0]
    if len({next(k for k in _PROMPT_KEYS if k in r) for r in rows}) > 1:
        raise ValueError("msgs: a batch must be all text or all input_ids")
    body: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(key, _DEFAULTS.get(key)) for r in rows]
        same = key not in _PROMPT_KEYS and all(v == values[0] for v in values)
        body[key] = values[0] if same else values
    return body


def _json_fields(msg: GenerateReq) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name == "sampling_params":
            out[f.name] = {k: v for k, v in value.to_dict().items() if v != _SAMPLING_DEFAULTS[k]}
        elif value is not None and value != _DEFAULTS.get(f.name):
            out[f.name] = value
    return out
