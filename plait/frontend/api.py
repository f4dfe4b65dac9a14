"""The DSL: ``function``, ``gen``, ``select``, role helpers and the default backend.

Names and arguments match ``sglang`` so a program ports by changing its import.
"""

from __future__ import annotations

from typing import Any, Callable

from plait.core.sampling_params import SamplingParams
from plait.frontend import ir, reasoning
from plait.frontend.backends.base import (  # noqa: F401 - the default-backend calls are DSL
    get_default_backend,
    resolve_backend,
    set_default_backend,
)
from plait.frontend.choices import ChoicesSamplingMethod, token_length_normalized
from plait.frontend.program import Function
from plait.frontend.roles import role_expr


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """Decorate ``def program(s, ...)``; also usable as ``@function()``.

    ``num_api_spec_tokens=N`` serves the program's gens from one generation of at least N
    tokens where the text allows (API speculative execution, ``plait.frontend.speculative``).
    """
    if num_api_spec_tokens is not None and (
        not isinstance(num_api_spec_tokens, int) or num_api_spec_tokens < 1
    ):
        raise ValueError(
            f"num_api_spec_tokens must be a positive integer or None, got {num_api_spec_tokens!r}"
        )
    if func is None:
        return lambda f: Function(f, num_api_spec_tokens=num_api_spec_tokens)
    return Function(func, num_api_spec_tokens=num_api_spec_tokens)


def flush_cache(backend: Any = None) -> Any:
    return resolve_backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> Any:
    return resolve_backend(backend).get_server_info()


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    dtype: Any = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: str | dict | None = None,
) -> ir.Expr:
    """Generate into variable ``name``. Unset parameters inherit ``run(...)``'s defaults.
    With ``choices`` this is :func:`select`; ``dtype`` (int/float/str/bool) constrains the
    output with a regex, which needs an engine with grammar support."""
    if choices is not None:
        return select(
            name,
            choices,
            0.0 if temperature is None else temperature,
            choices_method or token_length_normalized,
        )
    if isinstance(json_schema, dict):
        import json

        json_schema = json.dumps(json_schema)
    if dtype is not None:
        ir.dtype_regex(dtype)  # refuse a bad dtype here, where the program wrote it
    # a malformed constraint is refused here too, by the core's rule
    SamplingParams(regex=regex, json_schema=json_schema).check_grammar_syntax()
    params = ir.GenParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        return_logprob=return_logprob,
        logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num,
        dtype=dtype,
        regex=regex,
        json_schema=json_schema,
    )
    return ir.Gen(name, params)


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> ir.Expr:
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> ir.Expr:
    return gen(name, max_tokens, dtype=str, **kwargs)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> ir.Expr:
    """Pick one of ``choices`` by the model's likelihood of each after the current text."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"choices must be a non-empty list of strings, got {choices!r}")
    if not isinstance(choices_method, ChoicesSamplingMethod):
        raise ValueError(f"choices_method must be a ChoicesSamplingMethod, got {choices_method!r}")
    return ir.Select(name, list(choices), temperature, choices_method)


def system(expr: Any = None) -> ir.Expr:
    return role_expr("system", expr)


def user(expr: Any = None) -> ir.Expr:
    return role_expr("user", expr)


def assistant(expr: Any = None) -> ir.Expr:
    return role_expr("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> ir.Expr:
    """Run ``expr``, then split each of its named gens/selects: the variable and the text keep
    the answer, ``<name>_reasoning_content`` gets the reasoning (``<think>...</think>``, as
    ``model_type``'s SGLang reasoning parser marks it). Not with ``stream=True``."""
    reasoning.reasoning_format(model_type)  # an unknown family is refused where it is written
    if expr is None:
        raise ValueError("separate_reasoning: expr (the gen to split) is required")
    expr = ir.to_expr(expr)
    return ir.ExprList([expr, ir.SeparateReasoning(model_type, expr)])
