"""``Runtime``: programs run against an in-process :class:`plait.Engine` (no HTTP)."""
from __future__ import annotations

import os
from typing import Any, Iterator

from plait.frontend.backends.native import NativeBackend
from plait.frontend.chat_template import ChatTemplate

_REQUEST_KEYS = ("return_logprob", "logprob_start_len", "top_logprobs_num")


class Runtime(NativeBackend):
    """``Runtime(model_path=..., **engine_args)`` starts an engine; ``Runtime(engine)`` wraps
    an existing one (and leaves its shutdown to you)."""

    def __init__(self, model_path: Any = None, *, engine: Any = None, **engine_args: Any):
        super().__init__()
        if model_path is not None and not isinstance(model_path, (str, os.PathLike)):
            engine, model_path = model_path, None  # Runtime(existing_engine)
        if engine is not None and (model_path is not None or engine_args):
            raise ValueError("engine: pass either an existing engine or engine arguments")
        self._owns_engine = engine is None
        if engine is None:
            from plait.core.engine import Engine

            engine = Engine(model_path=model_path, **engine_args)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.chat_template = ChatTemplate.from_tokenizer(self.tokenizer)

    @property
    def endpoint(self) -> "Runtime":  # SGLang programs pass runtime.endpoint around
        return self

    def _engine_kwargs(self, payload: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: payload[k] for k in _REQUEST_KEYS if k in payload}
        if "text" in payload:
            kwargs["prompt"] = payload["text"]
        else:
            kwargs["input_ids"] = payload["input_ids"]
        kwargs["sampling_params"] = payload.get("sampling_params")
        return kwargs

    def _call(self, payload: dict[str, Any]) -> Any:
        return self.engine.generate(**self._engine_kwargs(payload))

    def _call_stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return iter(self.engine.generate(**self._engine_kwargs(payload), stream=True))

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()

    def shutdown(self) -> None:
        if self._owns_engine and self.engine is not None:
            self.engine.shutdown()
        self.engine = None
