"""The frontend's intermediate representation: the expressions a program appends to its state.

A program never talks to a model directly. ``s += expr`` queues an expression; the
interpreter (``plait.core.interpreter``) executes the queue against a backend. Expressions
compose with ``+`` (``"Q: " + gen("a")`` is an :class:`ExprList`), which is how SGLang programs
are written and why every class here is tiny.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from plait.frontend.choices import ChoicesSamplingMethod

# The patterns dtype= turns into (same as SGLang, so ported programs decode alike).
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""


@dataclasses.dataclass
class GenParams:
    """Sampling parameters of one ``gen``; ``None`` means "inherit the run's default".

    Field names are the engine's (``max_new_tokens``), the user-facing ``gen`` takes SGLang's
    ``max_tokens``. ``return_logprob`` etc. are request options, not sampling parameters;
    :meth:`engine_params` and :meth:`request_options` split them.
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

    _REQUEST_OPTIONS = ("return_logprob", "logprob_start_len", "top_logprobs_num")

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
        table = {int: REGEX_INT, "int": REGEX_INT, float: REGEX_FLOAT, "float": REGEX_FLOAT,
                 str: REGEX_STR, "str": REGEX_STR, bool: REGEX_BOOL, "bool": REGEX_BOOL}
        if self.dtype not in table:
            raise ValueError(f"dtype must be one of int, float, str, bool, got {self.dtype!r}")
        self.regex = table[self.dtype]
        if self.dtype in (int, "int", float, "float"):
            self.stop = _as_list(self.stop) + [" ", "\n"]

    def engine_params(self) -> dict[str, Any]:
        """The ``sampling_params`` dict of a native ``/generate`` request (unset keys dropped)."""
        skip = set(self._REQUEST_OPTIONS) | {"dtype"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}

    def request_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._REQUEST_OPTIONS if getattr(self, k) is not None}


def _as_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return list(stop)


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
    def __init__(self, name: str | None, choices: list[str], temperature: float,
                 choices_method: ChoicesSamplingMethod):
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


class Argument(Expr):
    """Stand-in for a program argument while tracing.

    Joining it with ``+`` keeps tracing going (it becomes a dynamic node); anything that needs
    its value (``str()``, f-strings, ``len``) ends the trace, because the prefix is over there.
    """

    def __init__(self, name: str):
        self.name = name

    def _stop(self, *args: Any, **kwargs: Any) -> Any:
        from plait.frontend.tracer import StopTracing
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


class Function:
    """A program: ``@pl.function def f(s, ...)``. Calling it runs it on the default backend."""

    def __init__(self, func: Callable[..., Any], bind_arguments: dict[str, Any] | None = None):
        import inspect

        params = list(inspect.signature(func).parameters.values())
        if not params:
            raise ValueError("a @function program must take the state `s` as its first argument")
        self.func = func
        self.arg_names = [p.name for p in params[1:]]
        self.bind_arguments = dict(bind_arguments or {})
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> "Function":
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise ValueError(f"bind: {unknown} are not arguments of {self.__name__}")
        return Function(self.func, {**self.bind_arguments, **kwargs})

    def run(self, *args: Any, stream: bool = False, backend: Any = None,
            **kwargs: Any) -> Any:
        """Run once. ``kwargs`` are program arguments or default sampling parameters
        (``max_new_tokens``, ``temperature``, ...). Returns the :class:`ProgramState`."""
        from plait.core.interpreter import run_program

        program_kwargs, defaults = split_sampling_kwargs(kwargs)
        return run_program(self, backend, args, program_kwargs, defaults, stream=stream)

    def run_batch(self, batch_kwargs: list[Any], *, backend: Any = None,
                  num_threads: int | str = "auto", progress_bar: bool = False,
                  **sampling: Any) -> list[Any]:
        """Run once per entry of ``batch_kwargs`` (dicts, or tuples of positional args),
        concurrently, after prefilling the program's traced shared prefix once."""
        from plait.core.interpreter import run_program_batch

        extra, defaults = split_sampling_kwargs(sampling)
        if extra:
            raise ValueError(f"run_batch: unknown keyword(s) {sorted(extra)}")
        batch = [self._as_kwargs(a) for a in batch_kwargs]
        return run_program_batch(self, backend, batch, defaults, num_threads=num_threads,
                                 progress_bar=progress_bar)

    def trace(self, *, backend: Any = None, **kwargs: Any) -> Any:
        """Run the program on placeholders and record its static prefix (see tracer)."""
        from plait.frontend.tracer import trace_program

        return trace_program(self, kwargs, backend)

    def cache(self, backend: Any = None) -> str:
        """Prefill the traced prefix on the backend now; returns the prefix text."""
        from plait.core.interpreter import cache_program

        return cache_program(self, backend)

    def _as_kwargs(self, item: Any) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        if isinstance(item, (list, tuple)) and len(item) <= len(self.arg_names):
            return dict(zip(self.arg_names, item))
        raise ValueError(f"run_batch: each item must be a dict or a tuple of at most "
                         f"{len(self.arg_names)} arguments, got {item!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)


_RUN_SAMPLING_KEYS = {f.name for f in dataclasses.fields(GenParams)} - {"dtype", "regex",
                                                                        "json_schema"}


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


def check_regex(regex: str | None) -> None:
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"regex is not a valid regular expression: {e}") from None
