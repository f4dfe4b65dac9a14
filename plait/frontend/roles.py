"""The chat roles a program writes in (``system``, ``user``, ``assistant``), defined once.

A program names a role in three places: the DSL's ``pl.user(...)`` (an expression it appends),
and ``s.user(...)`` or ``with s.user():`` on the state it receives, which is a
:class:`~plait.frontend.state.ProgramState` when it runs and a
:class:`~plait.frontend.tracer.TracerState` while it is traced. All three build the same
expressions here, so a traced prefix renders exactly as the run will.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from plait.frontend import ir


def role_expr(role: str, expr: Any = None) -> ir.Expr:
    """A whole message: ``role``'s begin marker, ``expr`` (when given), its end marker."""
    body = [] if expr is None else [ir.to_expr(expr)]
    return ir.ExprList([ir.RoleBegin(role), *body, ir.RoleEnd(role)])


class RoleMethods:
    """``s.system("...")`` appends a whole system message and returns ``None``;
    ``with s.system():`` opens one and closes it when the block ends, so what the block
    appends (gens included) is its content. The same for ``user`` and ``assistant``.
    A subclass says how an expression reaches it in :meth:`_append`."""

    def _append(self, expr: ir.Expr) -> None:
        raise NotImplementedError

    def system(self, expr: Any = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    def _role(self, role: str, expr: Any) -> Any:
        if expr is None:
            return self._role_scope(role)
        self._append(role_expr(role, expr))
        return None

    @contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self._append(ir.RoleBegin(role))
        yield
        self._append(ir.RoleEnd(role))
