"""``OpenAI``: programs run against any OpenAI-compatible server (``/v1/chat/completions``,
``/v1/completions``), including ``plait serve``.

A chat model sees only finished messages, so ``gen`` must open an assistant message
(``pl.assistant(pl.gen("x"))``). ``select`` needs prompt logprobs, which only the legacy
completions route returns (``echo=True, logprobs``); servers without it raise a clear error.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Iterator

from plait.frontend.backends import http
from plait.frontend.backends.base import FrontendBackend, TokenUsage
from plait.frontend.chat_template import ChatTemplate, chatml, load_tokenizer
from plait.frontend.choices import ChoicesDecision, ChoicesSamplingMethod, normalized_logprob
from plait.frontend.ir import GenParams


class OpenAI(FrontendBackend):
    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        is_chat_model: bool = True,
        tokenizer_path: str | None = None,
    ):
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.is_chat_model = is_chat_model
        # Only for rendering roles into s.text() (and completions prompts); the server
        # applies its own template to chat requests.
        tokenizer = load_tokenizer(tokenizer_path or model)
        self.chat_template = (
            ChatTemplate.from_tokenizer(tokenizer) if tokenizer is not None else chatml()
        )
        self.token_usage = TokenUsage()
        self._usage_lock = threading.Lock()

    def get_model_name(self) -> str:
        return self.model

    def _account(self, res: dict[str, Any]) -> None:
        """Add a response's ``usage`` (the server's own counts) to :attr:`token_usage`."""
        usage = res.get("usage") or {}
        with self._usage_lock:
            self.token_usage.prompt_tokens += usage.get("prompt_tokens") or 0
            self.token_usage.completion_tokens += usage.get("completion_tokens") or 0

    # ---- gen ------------------------------------------------------------------------------
    def _body(self, s: Any, params: GenParams) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
        }
        if params.stop:
            body["stop"] = params.stop
        optional = {
            "top_p": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            # not OpenAI's, but understood by SGLang/vLLM/plait servers:
            "top_k": -1,
            "min_p": 0.0,
            "ignore_eos": False,
            "regex": None,
        }
        for key, neutral in optional.items():
            value = getattr(params, key)
            if value is not None and value != neutral:
                body[key] = value
        if params.stop_token_ids:
            body["stop_token_ids"] = params.stop_token_ids
        if params.json_schema is not None:
            import json

            schema = params.json_schema
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "output",
                    "schema": json.loads(schema) if isinstance(schema, str) else schema,
                },
            }
        if self.is_chat_model:
            if s.cur_role != "assistant" or s.text_[s.cur_role_begin_pos :]:
                raise ValueError(
                    "OpenAI chat models can only generate a whole assistant "
                    "message: write pl.assistant(pl.gen(...))"
                )
            body["messages"] = list(s.messages_)
            if params.return_logprob:
                body["logprobs"] = True
                body["top_logprobs"] = params.top_logprobs_num or 0
            return "/chat/completions", body
        body["prompt"] = s.text_
        if params.return_logprob:
            body["logprobs"] = params.top_logprobs_num or 0
        return "/completions", body

    def generate(self, s: Any, params: GenParams) -> tuple[str, dict[str, Any]]:
        route, body = self._body(s, params)
        res = http.post(self.base_url + route, body, self.api_key)
        self._account(res)
        choice = res["choices"][0]
        text = choice["message"]["content"] if self.is_chat_model else choice["text"]
        meta = _meta(res, choice)
        if self.is_chat_model and choice["message"].get("reasoning_content") is not None:
            # a server with a reasoning parser split it off already (separate_reasoning)
            meta["reasoning_content"] = choice["message"]["reasoning_content"]
        return text or "", meta

    def generate_stream(self, s: Any, params: GenParams) -> Iterator[tuple[str, dict]]:
        route, body = self._body(s, params)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the last event carries the usage
        for event in http.post_sse(self.base_url + route, body, self.api_key):
            self._account(event)
            if not event.get("choices"):
                continue
            choice = event["choices"][0]
            delta = (
                (choice.get("delta") or {}).get("content")
                if self.is_chat_model
                else choice.get("text")
            )
            yield delta or "", _meta(event, choice)

    # ---- select ---------------------------------------------------------------------------
    def select(
        self, s: Any, choices: list[str], temperature: float, method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        if temperature > 1e-5:
            raise ValueError(f"select supports temperature=0 only, got {temperature}")
        if method.requires_unconditional_logprobs:
            raise NotImplementedError(
                f"{type(method).__name__} needs token ids; the OpenAI backend cannot provide them"
            )
        context = s.text_
        res = http.post(
            self.base_url + "/completions",
            {
                "model": self.model,
                "prompt": [context + c for c in choices],
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": 0,
            },
            self.api_key,
        )
        self._account(res)
        by_index = sorted(res["choices"], key=lambda c: c.get("index", 0))
        entries = []
        for choice_text, out in zip(choices, by_index):
            lp = out.get("logprobs") or {}
            if not lp.get("token_logprobs") or not lp.get("text_offset"):
                raise NotImplementedError(
                    "select: the server returned no prompt logprobs "
                    "(needs /completions with echo=True and logprobs)"
                )
            end = len(context) + len(choice_text)
            entries.append(
                [
                    [logprob, None, tok]
                    for tok, logprob, off in zip(
                        lp["tokens"], lp["token_logprobs"], lp["text_offset"]
                    )
                    if off < end and off + len(tok) > len(context)
                ]
            )
        return method(
            choices=choices,
            normalized_prompt_logprobs=[normalized_logprob(e) for e in entries],
            input_token_logprobs=entries,
        )


def _meta(res: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    usage = res.get("usage") or {}
    meta: dict[str, Any] = {
        "id": res.get("id"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "finish_reason": choice.get("finish_reason"),
    }
    if choice.get("logprobs") is not None:
        meta["logprobs"] = choice["logprobs"]
    return meta
