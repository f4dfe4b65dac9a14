"""``RuntimeEndpoint``: programs run against a ``plait serve`` (or SGLang) server through
its native ``/generate`` API."""
from __future__ import annotations

from typing import Any, Iterator

from plait.frontend.backends import http
from plait.frontend.backends.native import NativeBackend
from plait.frontend.chat_template import ChatTemplate, chatml, load_tokenizer


class RuntimeEndpoint(NativeBackend):
    """``RuntimeEndpoint("http://127.0.0.1:30000", api_key=None)``.

    The chat template (and the tokenizer that makes ``select`` exact) is loaded from the
    model path the server reports when that path exists locally, else from
    ``tokenizer_path``; failing both, role markers fall back to ChatML.
    """

    def __init__(self, base_url: str, api_key: str | None = None,
                 tokenizer_path: str | None = None):
        super().__init__()
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model_info = self._model_info()
        path = tokenizer_path or self.model_info.get("tokenizer_path") \
            or self.model_info.get("model_path")
        self.tokenizer = load_tokenizer(path) if path else None
        self.chat_template = (ChatTemplate.from_tokenizer(self.tokenizer)
                              if self.tokenizer is not None else chatml())

    @property
    def endpoint(self) -> "RuntimeEndpoint":
        return self

    def _model_info(self) -> dict[str, Any]:
        try:
            return http.get(self.base_url + "/get_model_info", self.api_key)
        except RuntimeError:  # a server without the route still serves /generate
            return {}

    def _call(self, payload: dict[str, Any]) -> Any:
        return http.post(self.base_url + "/generate", payload, self.api_key)

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return http.post_sse(self.base_url + "/generate", payload, self.api_key)

    def flush_cache(self) -> Any:
        return http.post(self.base_url + "/flush_cache", {}, self.api_key)

    def get_server_info(self) -> dict[str, Any]:
        return http.get(self.base_url + "/get_server_info", self.api_key)

    def shutdown(self) -> None:
        pass
