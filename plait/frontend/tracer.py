"""Tracing: run a program on placeholder arguments to learn its static prefix.

``run_batch`` uses the prefix to prefill the part every instance shares (few-shot examples,
a system prompt) once, before fanning out, so N programs hit a warm radix cache instead of
racing to compute the same tokens. The trace stops at the first thing whose value is unknown
until run time: a ``gen``/``select`` result being read, an argument used as a value, a fork.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from plait.frontend import ir
from plait.frontend.backends.base import resolve_backend
from plait.frontend.definition import ProgramDefinition
from plait.frontend.ir import StopTracing
from plait.frontend.roles import RoleMethods


@dataclass
class TracedProgram:
    nodes: list[ir.Expr] = field(default_factory=list)  # flat, in program order
    prefix: str = ""  # rendered text of the leading static nodes
    stopped_by: str = ""  # why tracing ended ("" = the program ran to completion)


class TracerState(RoleMethods):
    """Stands in for ``ProgramState``: records what is appended, never calls a model."""

    def __init__(self) -> None:
        self.nodes: list[ir.Expr] = []

    def __iadd__(self, other: Any) -> "TracerState":
        expr = ir.to_expr(other)
        self.nodes.extend(expr.exprs if isinstance(expr, ir.ExprList) else [expr])
        return self

    def _append(self, expr: ir.Expr) -> None:
        self += expr

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        yield

    def _unknown(self, *args: Any, **kwargs: Any) -> Any:
        raise StopTracing("the program read a run-time value")

    get_var = __getitem__ = get_meta_info = text = messages = fork = copy = _unknown
    text_iter = text_async_iter = _unknown

    def set_var(self, name: str, value: Any) -> None:
        pass

    __setitem__ = set_var

    def sync(self) -> None:
        pass

    def error(self) -> None:
        return None


def trace_program(
    program: ProgramDefinition, kwargs: dict[str, Any], backend: Any
) -> TracedProgram:
    """Trace ``program``; arguments not given in ``kwargs`` (or bound) become placeholders."""
    template = resolve_backend(backend).chat_template
    arguments = {name: ir.Argument(name) for name in program.arg_names}
    arguments.update(program.bind_arguments)
    arguments.update(kwargs)
    tracer = TracerState()
    stopped_by = ""
    try:
        program.func(tracer, **arguments)
    except StopTracing as e:
        stopped_by = str(e)
    except Exception as e:  # noqa: BLE001 - placeholders break user code in many ways
        stopped_by = f"{type(e).__name__}: {e}"
    return TracedProgram(tracer.nodes, _static_prefix(tracer.nodes, template), stopped_by)


def _static_prefix(nodes: list[ir.Expr], template: Any) -> str:
    text, roles = "", []
    for node in nodes:
        if isinstance(node, ir.Constant):
            text += node.value
        elif isinstance(node, ir.RoleBegin):
            text += template.prefix_and_suffix(node.role, roles)[0]
        elif isinstance(node, ir.RoleEnd):
            text += template.prefix_and_suffix(node.role, roles)[1]
            roles.append({"role": node.role})
        elif not isinstance(node, (ir.VarScopeBegin, ir.VarScopeEnd)):
            break
    return text
