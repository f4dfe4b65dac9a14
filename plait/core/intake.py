"""Request intake: the one place messages become ``Req``s, in the caller's thread.

A ``RequestIntake`` tokenizes, validates against the engine's limits and disaggregation
mode, compiles grammars and expands ``n``. What holds: every message of a call is checked
before any ``Req`` exists, so a bad one beside good ones stops them all, with a ValueError
naming the parameter, and nothing reaches the scheduler; a grammar compiles here (cached),
never on the scheduler thread, so a slow one cannot stall decoding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from plait.core.messages import GenerateReq, RequestLimits, check_rooms
from plait.core.request import Req
from plait.core.sampling_params import CONSTRAINTS, SamplingParams


def long_rope_namespace(regime: int) -> Any:
    """The prefix-cache namespace of base-model sequences past a RoPE switch at ``regime``."""
    return ("long-rope", regime)


class RequestIntake:
    def __init__(
        self,
        *,
        tokenizer: Any,
        context_len: int,
        vocab_size: int,
        max_total_tokens: int,
        eos_ids: set[int],
        disaggregation_mode: str,
        grammar_compile_timeout: float,
        lora_namespace: Callable[[str], Any] | None = None,
        rope_regime_length: int | None = None,
    ):
        """``lora_namespace``: an adapter name -> its prefix-cache namespace, ValueError
        naming ``lora_path`` for one not loaded; None: the engine has no adapters.
        ``rope_regime_length``: the model's length past which a forward rotates with other
        frequencies (``dynamic``/``longrope`` RoPE): base-model prompts longer than it get a
        prefix-cache namespace of their own, so a short prompt never reuses keys rotated with
        the long frequencies (nor a long one short keys it would not have computed)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = RequestLimits(
            context_len=context_len, vocab_size=vocab_size, max_total_tokens=max_total_tokens
        )
        self.eos_ids = eos_ids
        self.disaggregation_mode = disaggregation_mode
        self.grammar_compile_timeout = grammar_compile_timeout
        self.lora_namespace = lora_namespace
        self.rope_regime_length = rope_regime_length
        self.grammar_compiler: Any = None  # built on the first grammar
        self._grammar_lock = threading.Lock()

    def make_requests(self, msgs: list[GenerateReq]) -> list[Req]:
        """Tokenize, validate and expand ``n``. Raises ValueError naming the parameter."""
        check_rooms(msgs)
        checked = []
        for msg in msgs:
            msg = msg.tokenized(self.tokenizer.encode)
            msg.validate(self.limits)
            self._check_disaggregated(msg)
            namespace = self._lora(msg.lora_path)
            checked.append((msg, self._compile_grammar(msg.sampling_params), namespace))
        reqs = []
        for msg, grammar, namespace in checked:
            for one in msg.expand():
                # expand() names every sample and tokenized() filled the ids
                assert one.rid is not None and one.input_ids is not None
                sp = one.sampling_params
                req = Req(
                    rid=one.rid,
                    input_ids=list(one.input_ids),
                    sampling=sp,
                    return_logprob=one.return_logprob,
                    logprob_start_len=one.logprob_start_len,
                    top_logprobs_num=one.top_logprobs_num,
                    stream=one.stream,
                    bootstrap=one.bootstrap,
                    lora_id=one.lora_path,
                    cache_namespace=self._namespace(namespace, len(one.input_ids)),
                )
                if sp.seed is not None:
                    req.generator = torch.Generator().manual_seed(sp.seed)
                if grammar is not None:
                    req.grammar = grammar()
                reqs.append(req)
        return reqs

    def _namespace(self, lora: Any, prompt_len: int) -> Any:
        regime = self.rope_regime_length
        if lora is None and regime is not None and prompt_len > regime:
            return long_rope_namespace(regime)
        return lora

    def _lora(self, name: str | None) -> Any:
        if name is None:
            return None
        if self.lora_namespace is None:
            raise ValueError(
                f"lora_path {name!r}: this engine serves no LoRA adapters "
                "(start it with lora_paths / --lora-paths)"
            )
        return self.lora_namespace(name)

    def _check_disaggregated(self, msg: GenerateReq) -> None:
        """What a request must be in this engine's disaggregation mode (ValueError names the
        parameter). What a disaggregated request may ask for is ``GenerateReq.validate``'s."""
        mode = self.disaggregation_mode
        if mode == "null":
            if msg.bootstrap is not None:
                raise ValueError("bootstrap_room: this server is not in a disaggregation mode")
            return
        if msg.bootstrap is None:
            raise ValueError(
                f"bootstrap_room is required: this is a {mode} server (send "
                "requests through SGLang's gateway in PD mode)"
            )

    def _compile_grammar(self, sp: SamplingParams) -> Callable[[], Any] | None:
        """The compiled grammar's per-request state factory (None without a constraint)."""
        if all(getattr(sp, c) is None for c in CONSTRAINTS):
            return None
        from plait.core.grammar import GrammarCompiler, GrammarState

        vocab_size = self.vocab_size
        with self._grammar_lock:
            if self.grammar_compiler is None:
                self.grammar_compiler = GrammarCompiler(
                    self.tokenizer, vocab_size, compile_timeout=self.grammar_compile_timeout
                )
        compiled = self.grammar_compiler.compile_params(sp)
        ends = self.eos_ids | set(sp.stop_token_ids)
        return lambda: GrammarState(compiled, vocab_size, sorted(ends))
