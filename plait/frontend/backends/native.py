"""What every backend speaking plait's native ``/generate`` protocol shares.

``Runtime`` (in-process engine) and ``RuntimeEndpoint`` (HTTP) differ only in how the core's
request messages travel (:meth:`NativeBackend._call` / :meth:`_call_stream`); gen, select and
prefix caching are written once here, as ``GenerateReq`` messages, against the response shape
of docs/design.md.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from plait.core.messages import GenerateReq
from plait.core.schedule_policy import common_prefix_len
from plait.frontend.backends.base import FrontendBackend, TokenUsage
from plait.frontend.choices import ChoicesDecision, ChoicesSamplingMethod, normalized_logprob
from plait.frontend.global_config import global_config
from plait.frontend.ir import GenParams


@dataclass
class PrefillStats(TokenUsage):
    """Token accounting over every request this backend sent: SGLang's ``token_usage``
    fields, and what cache-hit measurements need besides."""

    requests: int = 0
    cached_tokens: int = 0

    @property
    def computed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class NativeBackend(FrontendBackend):
    tokenizer: Any = None  # optional; makes select exact at the context/choice boundary

    def __init__(self) -> None:
        self.stats = PrefillStats()
        self._stats_lock = threading.Lock()

    # ---- transport (subclasses) -----------------------------------------------------------
    def _call(self, msgs: list[GenerateReq]) -> list[dict[str, Any]]:
        """Send the messages together (so they batch); one output per message, in order."""
        raise NotImplementedError

    def _call_stream(self, msg: GenerateReq) -> Iterator[dict[str, Any]]:
        """Send one streaming message; yield response dicts whose ``text`` is cumulative."""
        raise NotImplementedError

    # ---- the backend contract the interpreter uses ----------------------------------------
    @property
    def token_usage(self) -> PrefillStats:
        """SGLang's ``backend.token_usage``: the same object as :attr:`stats`, for life."""
        return self.stats

    def generate(self, s: Any, params: GenParams) -> tuple[str, dict[str, Any]]:
        (out,) = self._request([self._gen_request(s, params)])
        return out["text"], out["meta_info"]

    def generate_stream(self, s: Any, params: GenParams) -> Iterator[tuple[str, dict]]:
        msg = dataclasses.replace(self._gen_request(s, params), stream=True)
        sent, last = 0, None
        for chunk in self._call_stream(msg):
            _check_finish(chunk)
            last = chunk
            delta = chunk["text"][sent:]
            sent += len(delta)
            yield delta, chunk["meta_info"]
        if last is not None:
            self._account([last])

    def cache_prefix(self, text: str) -> dict[str, Any]:
        """Prefill ``text`` without generating, so later requests find it in the radix cache."""
        return self._request([GenerateReq(text=text, sampling_params={"max_new_tokens": 0})])[0]

    def select(
        self, s: Any, choices: list[str], temperature: float, method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        """Score each choice by the engine's prompt logprobs of its tokens after the context:
        one request caches the context, one batched request scores every choice from it."""
        if not choices:
            raise ValueError("choices must be a non-empty list of strings")
        if temperature > 1e-5:
            raise ValueError(f"select supports temperature=0 only, got {temperature}")
        context = s.text_
        prompt_len = self.cache_prefix(context)["meta_info"]["prompt_tokens"] if context else 0
        counts, start = self._choice_token_counts(context, choices, prompt_len)
        outs = self._request(
            [
                GenerateReq(
                    text=context + c,
                    sampling_params={"max_new_tokens": 0, "temperature": 0},
                    return_logprob=True,
                    logprob_start_len=start,
                )
                for c in choices
            ]
        )
        entries = []
        for choice, count, out in zip(choices, counts, outs):
            reported = out["meta_info"]["input_token_logprobs"]
            if count > len(reported):
                raise RuntimeError(
                    f"engine reported {len(reported)} prompt logprobs from "
                    f"position {start}, choice {choice!r} needs {count}"
                )
            entries.append([list(e) for e in reported[len(reported) - count :]])
        unconditional = None
        if method.requires_unconditional_logprobs:
            outs = self._request(
                [
                    GenerateReq(
                        input_ids=[e[1] for e in es],
                        sampling_params={"max_new_tokens": 0},
                        return_logprob=True,
                        logprob_start_len=0,
                    )
                    for es in entries
                ]
            )
            unconditional = [o["meta_info"]["input_token_logprobs"] for o in outs]
        return method(
            choices=choices,
            normalized_prompt_logprobs=[normalized_logprob(e) for e in entries],
            input_token_logprobs=entries,
            unconditional_token_logprobs=unconditional,
        )

    # ---- helpers --------------------------------------------------------------------------
    def _gen_request(self, s: Any, params: GenParams) -> GenerateReq:
        """A gen's request; after a join over KV, as token ids that start with the joined
        sequence (its text re-tokenized could differ at a segment boundary and miss it)."""
        msg = _gen_request(s, params)
        if getattr(s, "kv_ids", None) is None or self.tokenizer is None:
            return msg
        return dataclasses.replace(msg, text=None, input_ids=self.prompt_ids(s))

    def prompt_ids(self, s: Any) -> list[int]:
        """``s.text_`` as token ids: the joined ids (when there are) plus the rest encoded
        without special tokens, else the whole text encoded as the engine would."""
        if getattr(s, "kv_ids", None) is None:
            return list(self.tokenizer.encode(s.text_))
        return [*s.kv_ids, *self.encode_tail(s.text_[s.kv_text_len :])]

    def encode_tail(self, text: str) -> list[int]:
        """Ids of text that continues a sequence: no BOS or other added tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _choice_token_counts(
        self, context: str, choices: list[str], prompt_len: int
    ) -> tuple[list[int], int]:
        """How many trailing prompt tokens belong to each choice, and where logprobs start.

        Tokenization can merge across the boundary (``"A: "`` + ``"B"`` -> ``"A:", " B"``);
        a choice then owns the merged token, so its score is comparable to the others'. With
        a tokenizer this is exact; without one, everything past the context's length counts.
        """
        if self.tokenizer is None:
            return self._counts_without_tokenizer(context, choices, prompt_len)
        encode = self.tokenizer.encode
        base = encode(context)
        offset = prompt_len - len(base)  # tokens the engine adds itself (e.g. a BOS)
        counts, shared = [], []
        for c in choices:
            ids = encode(context + c)
            k = common_prefix_len(base, ids)
            counts.append(len(ids) - k)
            shared.append(k)
        return counts, max(0, offset + min(shared))

    def _counts_without_tokenizer(
        self, context: str, choices: list[str], prompt_len: int
    ) -> tuple[list[int], int]:
        outs = self._request(
            [GenerateReq(text=context + c, sampling_params={"max_new_tokens": 0}) for c in choices]
        )
        counts = [max(1, o["meta_info"]["prompt_tokens"] - prompt_len) for o in outs]
        return counts, max(0, prompt_len - 1)

    def _request(self, msgs: list[GenerateReq]) -> list[dict[str, Any]]:
        outs = self._call(msgs)
        for o in outs:
            _check_finish(o)
        self._account(outs)
        return outs

    def _account(self, outs: list[dict[str, Any]]) -> None:
        with self._stats_lock:
            for o in outs:
                meta = o.get("meta_info", {})
                self.stats.requests += 1
                self.stats.prompt_tokens += meta.get("prompt_tokens", 0)
                self.stats.cached_tokens += meta.get("cached_tokens", 0)
                self.stats.completion_tokens += meta.get("completion_tokens", 0)

    def reset_stats(self) -> PrefillStats:
        """The counts so far (a copy); the live object restarts from zero."""
        with self._stats_lock:
            old = dataclasses.replace(self.stats)
            self.stats.reset()
        return old


def _gen_request(s: Any, params: GenParams) -> GenerateReq:
    """A gen's request, detokenized as ``global_config`` asks (as SGLang's endpoint sends)."""
    return params.to_request(
        s.text_,
        {
            "skip_special_tokens": global_config.skip_special_tokens_in_output,
            "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
        },
    )


def _check_finish(out: dict[str, Any]) -> None:
    reason = (out.get("meta_info") or {}).get("finish_reason") or {}
    if isinstance(reason, dict) and reason.get("type") == "abort":
        raise RuntimeError(f"request aborted: {reason.get('message', '')}")
