"""The frontend's intermediate representation: the expressions a program appends to its state.

A program never talks to a model directly. ``s += expr`` queues an expression; the
interpreter (``plait.frontend.interpreter``) executes the queue against a backend. Expressions
compose with ``+`` (``"Q: " + gen("a")`` is an :class:`ExprList`), which is how SGLang programs
are written and why every class here is tiny.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from plait.core.messages import GenerateReq
from plait.core.sampling_params import SamplingParams
from plait.frontend.choices import ChoicesSamplingMethod

# The patterns dtype= turns into (same as SGLang, so ported programs decode alike).
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""


@dataclasses.dataclass
class GenParams:
    """Sampling parameters of one ``gen``; ``None`` means "inherit the run's default".

    Field names are the core's (``max_new_tokens``), the user-facing ``gen`` takes SGLang's
    ``max_tokens``. Each field is either a ``SamplingParams`` field or a ``GenerateReq`` one
    (``return_logprob``, ...); :meth:`to_request` sorts them by those classes' own fields.
    """

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    dtype: Any = None
    regex: str | None = None
    json_schema: str | None = None

    def merged_over(self, default: "GenParams") -> "GenParams":
        """This gen's values where set, the run's defaults elsewhere (lists copied)."""
        out = dataclasses.replace(default)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(out, f.name, value)
        out.stop = _as_list(out.stop)
        out.stop_token_ids = list(out.stop_token_ids or [])
        return out

    def apply_dtype(self) -> None:
        """Turn ``dtype=int|float|str|bool`` into the matching regex (and stops), like SGLang."""
        if self.dtype is None:
            return
        self.regex = dtype_regex(self.dtype)
        if self.dtype in (int, "int", float, "float"):
            self.stop = _as_list(self.stop) + [" ", "\n"]

    def to_request(self, text: str, extra_sampling: dict[str, Any] | None = None) -> GenerateReq:
        """This gen as the core's request message for ``text`` (call after
        :meth:`merged_over` and :meth:`apply_dtype`); unset fields take the core's defaults,
        ``extra_sampling`` adds sampling fields a gen has no argument for (detokenization).
        Raises ``ValueError`` naming a bad parameter."""
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        sampling = {k: v for k, v in values.items() if k in _SAMPLING_FIELDS}
        sampling.update(extra_sampling or {})
        options = {k: v for k, v in values.items() if k in _REQUEST_FIELDS}
        return GenerateReq(text=text, sampling_params=sampling, **options)


_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_REQUEST_FIELDS = {f.name for f in dataclasses.fields(GenerateReq)} - {"text", "input_ids"}
_DTYPE_REGEX = {
    int: REGEX_INT,
    "int": REGEX_INT,
    float: REGEX_FLOAT,
    "float": REGEX_FLOAT,
    str: REGEX_STR,
    "str": REGEX_STR,
    bool: REGEX_BOOL,
    "bool": REGEX_BOOL,
}


def dtype_regex(dtype: Any) -> str:
    """The regex ``gen(dtype=...)`` constrains the output with."""
    try:
        return _DTYPE_REGEX[dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of int, float, str, bool, got {dtype!r}") from None


def _as_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return list(stop)


_RUN_SAMPLING_KEYS = {f.name for f in dataclasses.fields(GenParams)} - {
    "dtype",
    "regex",
    "json_schema",
}


def split_sampling_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], GenParams]:
    """Separate ``run(..., temperature=0, question="...")`` into program args and defaults."""
    sampling = {k: kwargs[k] for k in kwargs if k in _RUN_SAMPLING_KEYS}
    if "max_tokens" in kwargs:  # accepted as an alias, as in gen()
        sampling.setdefault("max_new_tokens", kwargs["max_tokens"])
    program = {k: v for k, v in kwargs.items() if k not in sampling and k != "max_tokens"}
    defaults = GenParams(max_new_tokens=128, temperature=1.0)
    for k, v in sampling.items():
        if v is not None:
            setattr(defaults, k, v)
    return program, defaults


class StopTracing(Exception):
    """Raised while tracing when the program needs a value that only a run can produce."""


class Expr:
    """Base of everything ``s += ...`` accepts (besides ``str``)."""

    def __add__(self, other: Any) -> "ExprList":
        return ExprList([self, to_expr(other)])

    def __radd__(self, other: Any) -> "ExprList":
        return ExprList([to_expr(other), self])


class ExprList(Expr):
    def __init__(self, exprs: list[Expr]):
        flat: list[Expr] = []
        for e in exprs:
            flat.extend(e.exprs if isinstance(e, ExprList) else [e])
        self.exprs = flat

    def __repr__(self) -> str:
        return f"ExprList({self.exprs})"


class Constant(Expr):
    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class Gen(Expr):
    def __init__(self, name: str | None, params: GenParams):
        self.name = name
        self.params = params

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class Select(Expr):
    def __init__(
        self,
        name: str | None,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ):
        self.name = name
        self.choices = choices
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, {self.choices!r})"


class RoleBegin(Expr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role})"


class RoleEnd(Expr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role})"


class VarScopeBegin(Expr):
    def __init__(self, name: str):
        self.name = name


class VarScopeEnd(Expr):
    def __init__(self, name: str):
        self.name = name


class CommitPrefix(Expr):
    """Prefill the text so far (``max_new_tokens=0``) so later requests hit the radix cache."""


class ConcatAndAppend(Expr):
    """Append the text each fork branch added after the fork point (``join`` mode)."""

    def __init__(self, states: list[Any]):
        self.states = states


class SeparateReasoning(Expr):
    """Runs after ``expr``: each gen/select it names becomes its answer (variable and text)
    and ``<name>_reasoning_content`` its reasoning (see ``plait.frontend.reasoning``)."""

    def __init__(self, model_type: str, expr: Expr):
        self.model_type = model_type
        self.names = _result_names(expr)
        if any(n is None for n in self.names):
            raise ValueError("separate_reasoning: every gen/select in expr needs a name")

    @staticmethod
    def reasoning_name(name: str) -> str:
        return f"{name}_reasoning_content"

    def __repr__(self) -> str:
        return f"SeparateReasoning({self.model_type!r}, {self.names!r})"


def _result_names(expr: Expr) -> list[Any]:
    if isinstance(expr, ExprList):
        return [n for e in expr.exprs for n in _result_names(e)]
    return [expr.name] if isinstance(expr, (Gen, Select)) else []


class Argument(Expr):
    """Stand-in for a program argument while tracing.

    Joining it with ``+`` keeps tracing going (it becomes a dynamic node); anything that needs
    its value (``str()``, f-strings, ``len``) ends the trace, because the prefix is over there.
    """

    def __init__(self, name: str):
        self.name = name

    def _stop(self, *args: Any, **kwargs: Any) -> Any:
        raise StopTracing(f"argument {self.name!r} was used as a value")

    __str__ = __format__ = __len__ = __iter__ = __getitem__ = __bool__ = __int__ = _stop
    __eq__ = __lt__ = __gt__ = __hash__ = __contains__ = __getattr__ = _stop

    def __repr__(self) -> str:
        return f"Argument({self.__dict__['name']!r})"


def to_expr(x: Any) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return Constant(x)
    raise TypeError(f"cannot append {type(x).__name__} to a program state; use str(...)")
