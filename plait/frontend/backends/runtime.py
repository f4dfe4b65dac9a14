"""``Runtime``: programs run against an in-process :class:`plait.Engine` (no HTTP)."""

from __future__ import annotations

import os
from typing import Any, Iterator

from plait.core.messages import GenerateReq
from plait.frontend.backends.native import NativeBackend
from plait.frontend.chat_template import ChatTemplate


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

    def _call(self, msgs: list[GenerateReq]) -> list[dict[str, Any]]:
        return self.engine.generate_request(msgs)

    def _call_stream(self, msg: GenerateReq) -> Iterator[dict[str, Any]]:
        return iter(self.engine.generate_request([msg]))

    @property
    def support_concate_and_append(self) -> bool:  # type: ignore[override]
        """The engine can join KV: radix cache on, one token per page, no tensor or pipeline
        parallelism (the KV lives in the rank processes)."""
        config = self.engine.config
        return (
            config.page_size == 1
            and not config.disable_radix_cache
            and config.tp_size == 1
            and config.pp_size == 1
            and config.disaggregation_mode == "null"
        )

    def concatenate_and_append(self, s: Any, branches: list[Any]) -> list[int]:
        """Commit each branch's whole text (cached already when it ends with a gen), then
        have the engine join the branches' KV after the parent's tokens. A branch whose
        tokens do not start with the parent's (a token merged across the fork point) is
        committed as the parent's ids plus its own text's."""
        prefix = self.prompt_ids(s)
        sequences = []
        for branch in branches:
            ids = self.prompt_ids(branch)
            if ids[: len(prefix)] != prefix:
                ids = prefix + self.encode_tail(branch.text_[branch.fork_start_text_pos :])
            self._request([GenerateReq(input_ids=ids, sampling_params={"max_new_tokens": 0})])
            sequences.append(ids)
        return self.engine.concat_and_append(prefix, sequences)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()

    def get_model_name(self) -> str:
        """The engine's model directory (what ``plait serve`` reports as ``model_path``)."""
        return self.engine.get_server_info()["model_path"]

    def shutdown(self) -> None:
        if self._owns_engine and self.engine is not None:
            self.engine.shutdown()
        self.engine = None
