"""Sampling parameters: SGLang's names, validated up front so bad input never reaches the
scheduler. Every error is a ``ValueError`` that names the parameter.

Invariant after ``normalize()``: every number is finite and in a range whose arithmetic cannot
overflow float32 in the sampler (so one request's values can never produce inf/NaN for its
batch); a temperature below ``GREEDY_TEMPERATURE`` is exactly 0 (greedy), as in SGLang.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

_UNSET = object()

GREEDY_TEMPERATURE = 1e-5  # below this, sampling is argmax (SGLang's _SAMPLING_EPS)
MIN_REPETITION_PENALTY = 1e-2  # logits are divided by it: 1e-45 turns them into inf
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range (seed + i for n > 1)
MAX_GRAMMAR_CHARS = 64 * 1024  # regex / json_schema / ebnf text; compile time grows with it
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for one token's bias: [-100, 100]
# The decoding constraints, at most one per request (compiled by ``plait.core.grammar``).
CONSTRAINTS = ("regex", "json_schema", "ebnf", "structural_tag")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    # xgrammar's structural tag (JSON text, ``{"type": "structural_tag", "format": ...}``):
    # free text with constrained regions, e.g. tool calls whose arguments follow a schema.
    structural_tag: str | None = None
    # token id -> added to that token's logit before sampling (greedy included). JSON gives the
    # ids as strings ("42"), the Engine API may give ints; normalize() makes them ints and an
    # empty map None.
    logit_bias: dict[int, float] | None = None

    @classmethod
    def from_dict(cls, params: "dict[str, Any] | SamplingParams | None") -> "SamplingParams":
        """Build from a request dict; unknown keys are an error, not silently dropped."""
        if params is None:
            return cls()
        if isinstance(params, SamplingParams):
            return params
        if not isinstance(params, dict):
            raise ValueError(f"sampling_params must be a dict, got {type(params).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"sampling_params: unknown parameter(s) {unknown}")
        values = {k: v for k, v in params.items() if v is not None or k in ("seed",)}
        sp = cls(**values)
        sp.normalize()
        return sp

    def normalize(self) -> None:
        """Coerce convenient forms (a single stop string, a dict json_schema) and validate."""
        import json

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)
        if isinstance(self.structural_tag, dict):
            self.structural_tag = json.dumps(self.structural_tag)
        self.logit_bias = _normalize_logit_bias(self.logit_bias)
        self.validate()
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name} {msg}, got {repr(getattr(self, name))[:80]}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:  # finite: inf and NaN are never a sampling setting
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        check(
            is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
            "max_new_tokens",
            "must be an integer >= 0",
        )
        check(
            is_int(self.min_new_tokens) and self.min_new_tokens >= 0,
            "min_new_tokens",
            "must be an integer >= 0",
        )
        check(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            "must be <= max_new_tokens",
        )
        check(
            is_num(self.temperature) and self.temperature >= 0,
            "temperature",
            "must be a finite number >= 0",
        )
        check(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(
            is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 0),
            "top_k",
            "must be -1 (disabled) or a non-negative integer",
        )
        check(is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(
            is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            "must be in [-2, 2]",
        )
        check(
            is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
            "presence_penalty",
            "must be in [-2, 2]",
        )
        check(
            is_num(self.repetition_penalty)
            and MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2,
            "repetition_penalty",
            f"must be in [{MIN_REPETITION_PENALTY}, 2]",
        )
        check(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        check(
            self.seed is None
            or (is_int(self.seed) and is_int(self.n) and 0 <= self.seed <= MAX_SEED - self.n + 1),
            "seed",
            "must be an integer in [0, 2**63 - n] or null",
        )
        check(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "must be a non-empty string or a list of them",
        )
        check(
            isinstance(self.stop_token_ids, list)
            and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be a list of non-negative integers",
        )
        check(
            self.logit_bias is None
            or (
                isinstance(self.logit_bias, dict)
                and all(
                    is_int(t)
                    and t >= 0
                    and isinstance(b, (int, float))
                    and not isinstance(b, bool)
                    and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                    for t, b in self.logit_bias.items()
                )
            ),
            "logit_bias",
            "must map token ids to biases in [-100, 100]",
        )
        if vocab_size is not None:
            check(
                all(t < vocab_size for t in self.stop_token_ids),
                "stop_token_ids",
                f"must be < vocab size {vocab_size}",
            )
            bad = [t for t in self.logit_bias or () if t >= vocab_size]
            if bad:
                raise ValueError(f"logit_bias holds token ids outside [0, {vocab_size}): {bad[:5]}")
        constraints = [c for c in CONSTRAINTS if getattr(self, c) is not None]
        if len(constraints) > 1:
            raise ValueError(f"only one of {', '.join(CONSTRAINTS)} may be set, got {constraints}")
        for c in constraints:
            check(isinstance(getattr(self, c), str), c, "must be a string")
            check(
                len(getattr(self, c)) <= MAX_GRAMMAR_CHARS,
                c,
                f"must be at most {MAX_GRAMMAR_CHARS} characters",
            )

    def check_grammar_syntax(self) -> None:
        """Cheap syntax checks of ``regex`` (Python's ``re``) and ``json_schema`` (JSON, an
        object), for callers that hold no grammar compiler: the HTTP process and the frontend
        refuse a malformed constraint at once. The engine's compiler (``grammar.py``) does the
        full check, with its own messages, when it compiles."""
        import json
        import re

        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex is not a valid regular expression: {e}") from None
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError("json_schema must be a JSON object")
        if self.structural_tag is not None:
            try:
                tag = json.loads(self.structural_tag)
            except json.JSONDecodeError as e:
                raise ValueError(f"structural_tag is not valid JSON: {e}") from None
            if not isinstance(tag, dict):
                raise ValueError("structural_tag must be a JSON object")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normalize_logit_bias(bias: Any) -> Any:
    """``{"42": 5}`` (JSON's string keys, as OpenAI and SGLang send them) or ``{42: 5}`` ->
    ``{42: 5}``; ``{}`` -> ``None``. A key that is not a plain decimal token id raises here,
    naming ``logit_bias``; other shapes are left for ``validate`` to refuse."""
    if not isinstance(bias, dict):
        return bias
    out: dict[Any, Any] = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)
        elif not (isinstance(key, int) and not isinstance(key, bool)):
            raise ValueError(
                f"logit_bias keys must be token ids (non-negative integers), got {str(key)[:40]!r}"
            )
        out[key] = value
    return out or None
