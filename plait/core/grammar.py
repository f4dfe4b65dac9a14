"""Structured generation: regex / JSON schema / EBNF / structural tag / choices constraints,
compiled by xgrammar.

Two halves with different threading rules:

- ``GrammarCompiler`` (one per engine) turns a constraint into an immutable ``CompiledGrammar``.
  It is thread-safe and is meant to be called from the submitting thread (``Engine.generate``,
  the HTTP handler), so a slow grammar never stalls the scheduler loop. Work per grammar is
  bounded: the text's length (``SamplingParams``), regex repetition counts, and compile time
  (compiles run on a small worker pool; a caller waits at most ``compile_timeout`` seconds and
  gets a ``ValueError``; a compile that finishes later still fills the cache).
- ``GrammarState`` (one per request) is the mutable matcher. It is NOT thread-safe: only the
  scheduler thread touches it, once per step (mask -> sample -> accept).

Invariants:
- Every token id is checked against the model's logits width (``vocab_size``), which may exceed
  ``len(tokenizer)``; ids the tokenizer does not know are never allowed.
- The request's EOS ids are the grammar's stop tokens: allowed exactly when the grammar may end,
  and the only tokens allowed once it has ended.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch
import xgrammar as xgr

from plait.core.sampling_params import CONSTRAINTS, SamplingParams

CompiledGrammar = xgr.CompiledGrammar
GRAMMAR_KINDS = (*CONSTRAINTS, "choices")

# xgrammar errors read "[18:32:43] /project/cpp/regex_converter.cc:83: Regex parsing error ...".
_XGR_ERROR_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: .*? is false: )?")

# A bounded repetition is unrolled: a{3000001} forces a 3 MB string that the jump-forward step
# would rebuild every decode step. No output can be that long anyway (context length).
MAX_REGEX_REPEAT = 10_000
_REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


def check_regex_repeats(regex: str) -> None:
    """``ValueError`` naming ``regex`` if a ``{m}`` / ``{m,n}`` count exceeds the bound."""
    for m in _REPEAT.finditer(regex):
        count = max(int(x) for x in m.groups() if x)
        if count > MAX_REGEX_REPEAT:
            raise ValueError(f"regex repetition count {count} exceeds {MAX_REGEX_REPEAT}")


def _xgr_message(err: Exception) -> str:
    return _XGR_ERROR_PREFIX.sub("", str(err)).strip()


def choices_to_ebnf(choices: list[str]) -> str:
    """An EBNF alternation matching exactly one of ``choices``. JSON string escapes are valid
    EBNF string literals in xgrammar, so any text (quotes, newlines, unicode) is safe."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices must be a non-empty list of strings, got {choices!r}")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """One per engine: compiles regex / json_schema / ebnf / choices into an xgrammar
    ``CompiledGrammar``, cached by ``(kind, spec)`` (thread-safe, LRU-bounded).

    Compilation happens in the SUBMITTING thread, never in the scheduler loop. Two threads asking
    for the same key at once share one compilation (the second waits for the first).

    ``kind="choices"`` takes ``spec`` as a JSON array of strings. JSON schemas are compiled with
    fixed separators (``", "`` and ``": "``) unless ``json_any_whitespace=True``: a small model
    allowed arbitrary whitespace can loop on newlines forever, and fixed layout also makes long
    jump-forward strings possible.
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        *,
        max_cache_entries: int = 256,
        json_any_whitespace: bool = False,
        max_threads: int = 8,
        compile_timeout: float = 10.0,
    ) -> None:
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if max_cache_entries < 1:
            raise ValueError(f"max_cache_entries must be >= 1, got {max_cache_entries!r}")
        if not compile_timeout > 0:
            raise ValueError(f"compile_timeout must be > 0, got {compile_timeout!r}")
        self.compile_timeout = compile_timeout
        self.vocab_size = vocab_size
        self.max_cache_entries = max_cache_entries
        self.json_any_whitespace = json_any_whitespace
        stop = tokenizer.eos_token_id
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=None if stop is None else [stop]
        )
        # Our own LRU replaces xgrammar's cache, whose default size is unbounded.
        self._xgr = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads, cache_enabled=False
        )
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future] = {}
        self._lock = threading.RLock()  # a done-callback may run inside it
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="plait-grammar")

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Compile (or fetch from cache). ``ValueError`` names the problem for bad input, or
        says the grammar did not compile within ``compile_timeout``. Callers asking for the
        same key at once share one compilation."""
        if kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {kind!r}")
        if not isinstance(spec, str):
            raise ValueError(f"{kind} must be a string, got {type(spec).__name__}")
        if kind == "regex":
            check_regex_repeats(spec)
        key = (kind, spec)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
            future = self._inflight.get(key)
            if future is None:
                future = self._inflight[key] = self._pool.submit(self._compile_uncached, kind, spec)
                future.add_done_callback(lambda f: self._store(key, f))
        try:
            return future.result(timeout=self.compile_timeout)  # re-raises its ValueError
        except TimeoutError:
            raise ValueError(
                f"{kind} did not compile within {self.compile_timeout:g}s; simplify the constraint"
            ) from None

    def _store(self, key: tuple[str, str], future: Future) -> None:
        with self._lock:
            self._inflight.pop(key, None)
            if future.exception() is not None:
                return
            self._cache[key] = future.result()
            while len(self._cache) > self.max_cache_entries:
                self._cache.popitem(last=False)

    def compile_params(self, sp: SamplingParams) -> CompiledGrammar | None:
        """The grammar for ``sp``'s constraint (``CONSTRAINTS``); None if unconstrained
        (``SamplingParams.validate`` already guarantees at most one is set)."""
        for kind in CONSTRAINTS:
            spec = getattr(sp, kind)
            if spec is not None:
                if kind == "json_schema" and isinstance(spec, dict):
                    spec = json.dumps(spec)
                return self.compile(kind, spec)
        return None

    def cache_size(self) -> int:
        with self._lock:
            return len(self._cache)

    def _compile_uncached(self, kind: str, spec: str) -> CompiledGrammar:
        if kind == "json_schema":
            return self._compile_json_schema(spec)
        if kind == "choices":
            try:
                choices = json.loads(spec)
            except json.JSONDecodeError as err:
                raise ValueError(f"choices must be a JSON array of strings: {err}") from None
            kind, spec = "ebnf", choices_to_ebnf(choices)
        try:
            if kind == "regex":
                return self._xgr.compile_regex(spec)
            if kind == "structural_tag":
                return self._xgr.compile_structural_tag(spec)
            return self._xgr.compile_grammar(spec)
        except RuntimeError as err:  # xgrammar's Invalid*Error included
            raise ValueError(f"invalid {kind}: {_xgr_message(err)}") from None

    def _compile_json_schema(self, spec: str) -> CompiledGrammar:
        import jsonschema

        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"json_schema is not valid JSON: {err}") from None
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"json_schema is not a valid JSON schema: {err.message}") from None
        try:
            return self._xgr.compile_json_schema(spec, any_whitespace=self.json_any_whitespace)
        except RuntimeError as err:
            raise ValueError(f"json_schema is not supported: {_xgr_message(err)}") from None


class GrammarState:
    """Per-request matcher state; used by the scheduler thread only (not thread-safe).

    ``eos_token_ids`` are every id that ends the request (tokenizer EOS, generation-config EOS,
    ``stop_token_ids``): the grammar allows them only where it may end and, once one has been
    accepted (``is_terminated``), the mask allows nothing else.
    """

    def __init__(
        self, compiled: CompiledGrammar, vocab_size: int, eos_token_ids: int | list[int]
    ) -> None:
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        eos_token_ids = sorted(set(eos_token_ids))
        if not eos_token_ids:
            raise ValueError("eos_token_ids must name at least one token")
        if compiled.tokenizer_info.vocab_size != vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} does not match the compiler's "
                f"{compiled.tokenizer_info.vocab_size}"
            )
        if not all(0 <= t < vocab_size for t in eos_token_ids):
            raise ValueError(f"eos_token_ids must be in [0, {vocab_size}), got {eos_token_ids}")
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.num_accepted = 0
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=eos_token_ids)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar rejects it."""
        if self._matcher.is_terminated():
            return False  # xgrammar would also log a warning
        if not self._matcher.accept_token(int(token_id)):
            return False
        self.num_accepted += 1
        return True

    def is_terminated(self) -> bool:
        """True once a stop token has been accepted."""
        return self._matcher.is_terminated()

    def jump_forward_string(self) -> str:
        """The unique forced continuation, "" if none (or terminated)."""
        if self._matcher.is_terminated():
            return ""
        return self._matcher.find_jump_forward_string()

    def forced_token(self) -> int | None:
        """The only token the grammar allows next, None if there are several (or none)."""
        if self._matcher.is_terminated():
            return None
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self._matcher.fill_next_token_bitmask(bitmask, 0)
        words = bitmask[0].nonzero().flatten().tolist()
        if len(words) != 1:
            return None
        bits = int(bitmask[0, words[0]]) & 0xFFFFFFFF
        if bits & (bits - 1):
            return None
        return words[0] * 32 + bits.bit_length() - 1

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (the stop token included)."""
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"num_tokens must be in [0, {self.num_accepted}], got {num_tokens}")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    def reset(self, accepted_tokens: list[int]) -> None:
        """Rebuild from scratch (a retracted request resumed): replay ``accepted_tokens``."""
        self._matcher.reset()
        self.num_accepted = 0
        for i, token_id in enumerate(accepted_tokens):
            if not self.accept_token(token_id):
                raise ValueError(f"accepted_tokens[{i}] = {token_id} is rejected by the grammar")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this state's allowed-token bits into ``bitmask[row]`` (int32, CPU)."""
        if self._matcher.is_terminated():
            _write_only(bitmask[row], self.eos_token_ids)
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)


def _write_only(row: torch.Tensor, token_ids: list[int]) -> None:
    """Set ``row`` (one int32 bitmask row) so that only ``token_ids`` are allowed."""
    words: dict[int, int] = {}
    for t in token_ids:
        words[t // 32] = words.get(t // 32, 0) | (1 << (t % 32))
    row.zero_()
    for word, bits in words.items():
        row[word] = bits - (1 << 32) if bits >= 1 << 31 else bits  # int32 is signed


_batch_matcher: xgr.BatchGrammarMatcher | None = None
_batch_lock = threading.Lock()


def _mask_backend(device: torch.device) -> Literal["cpu", "triton", "torch_native"]:
    """xgrammar's kernel for ``device``: its C++ loop on CPU, Triton on CUDA when installed,
    plain torch ops elsewhere (works on any device; no device library imported here)."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch_native"


def apply_grammar_masks(logits: torch.Tensor, states: list[GrammarState | None]) -> None:
    """In place: for each row whose state is not None, set disallowed tokens' logits to -inf.

    One int32 bitmask of shape ``(batch, ceil(vocab_size / 32))`` is filled on CPU (in parallel
    via xgrammar's batch matcher), copied to ``logits.device`` and applied to the constrained rows
    only. Columns past ``vocab_size`` (padded logits) are masked for those rows too.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(
            f"logits must be (len(states), vocab), got {tuple(logits.shape)} "
            f"for {len(states)} states"
        )
    present = {i: s for i, s in enumerate(states) if s is not None}
    rows = list(present)
    if not rows:
        return
    vocab_size = present[rows[0]].vocab_size
    if any(present[i].vocab_size != vocab_size for i in rows):
        raise ValueError("all grammar states in a batch must share one vocab_size")
    if logits.shape[1] < vocab_size:
        raise ValueError(f"logits width {logits.shape[1]} < grammar vocab_size {vocab_size}")
    bitmask = xgr.allocate_token_bitmask(len(states), vocab_size)
    live = [i for i in rows if not present[i].is_terminated()]
    for i in set(rows) - set(live):
        present[i].fill_bitmask(bitmask, i)
    if len(live) == 1:
        present[live[0]].fill_bitmask(bitmask, live[0])
    elif live:
        global _batch_matcher
        with _batch_lock:  # one shared thread pool; engines in other threads take turns
            if _batch_matcher is None:
                _batch_matcher = xgr.BatchGrammarMatcher()
            _batch_matcher.batch_fill_next_token_bitmask(
                [present[i]._matcher for i in live], bitmask, live
            )
    bitmask = bitmask.to(logits.device)
    xgr.apply_token_bitmask_inplace(
        logits, bitmask, vocab_size=vocab_size, indices=rows, backend=_mask_backend(logits.device)
    )
    if logits.shape[1] > vocab_size:
        logits[rows, vocab_size:] = float("-inf")
