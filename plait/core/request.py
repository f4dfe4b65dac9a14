"""A request's state as it moves through the scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from plait.core.finish_reason import FinishReason
from plait.core.sampling_params import SamplingParams


@dataclass(eq=False)
class Req:
    """One sequence being generated (a prompt with ``n > 1`` becomes n of these).

    Requests compare by identity (``eq=False``): the scheduler's list membership and removal
    (``req in running``) must not compare every field of two requests, which made each test
    cost a field-by-field walk and a batch of 256 quadratic in it.

    KV ownership: ``req_to_token[req_pool_idx, :kv_len]`` hold this request's KV slots. The
    first ``cache_len`` of them belong to the radix tree (locked through ``last_node``); slots
    ``cache_len..kv_len`` were allocated by this request and are freed or handed to the tree by
    it. The last sampled token never has KV yet: it is the next forward's input.

    Overlap schedule: while a batch that samples this request's next token is in flight,
    ``future`` is that token's placeholder (see ``future_tokens.py``) and the token is not in
    ``output_ids`` yet; a decode built meanwhile feeds the placeholder and moves ``kv_len`` past
    it, so ``kv_len`` may be ``len(fill_ids) + 1`` until the batch is processed.
    """

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    #: the caller detokenizes the streamed ids itself (the server's HTTP process, off the
    #: scheduler's GIL): its text is decoded once, when it finishes, unless it stops on strings
    detokenize_later: bool = False
    on_output: Callable[["Req", bool], None] | None = None
    grammar: Any = None  # plait.core.grammar.GrammarState when constrained
    bootstrap: Any = None  # plait.core.messages.Bootstrap (disaggregated)
    lora_id: str | None = None  # the LoRA adapter's name (None: the base model)
    cache_namespace: Any = None  # the adapter's prefix-cache namespace (its uid)

    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    kv_len: int = 0
    cache_len: int = 0
    last_node: Any = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    reason: FinishReason | None = None  # set once, by ``finish``
    generator: torch.Generator | None = None
    future: int | None = None  # placeholder of the next token, while in flight
    spec: Any = None  # plait.core.spec.ngram.DraftState under speculative decoding
    traits: Any = None  # plait.core.decode_traits.Traits, cached on its first step

    detok: Any = None  # IncrementalDetokenizer
    text: str = ""  # output text so far (stop strings trimmed)
    sent_len: int = 0  # chars of text already streamed

    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)

    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finished_time: float | None = None
    times_retracted: int = 0

    @property
    def fill_ids(self) -> list[int]:
        """Tokens whose KV the model must hold before the next sample."""
        return self.input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.reason is not None

    @property
    def finish_reason(self) -> dict | None:
        """Why it ended, in the wire format the server returns (None while it runs)."""
        return None if self.reason is None else self.reason.to_dict()

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.output_ids

    def max_prefix_len(self) -> int:
        """Longest cache match allowed: at least one token must be computed to get logits, and
        prompt logprobs need logits from the position before ``logprob_start_len``."""
        limit = len(self.fill_ids) - 1
        if self.wants_input_logprobs:
            limit = min(limit, max(0, self.logprob_start_len - 1))
        return limit

    def finish(self, reason: FinishReason) -> None:
        """End the request; the first reason given wins."""
        if self.reason is None:
            self.reason = reason
            self.finished_time = time.perf_counter()
