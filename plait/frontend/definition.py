"""What running, tracing and batching need to know of a program, and nothing more.

:class:`plait.frontend.program.Function` (``@pl.function``) is the one implementation, and it
calls the interpreter, the tracer and the batch runner. They take this protocol instead of
the class, so none of them imports the module that imports them.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol


class ProgramDefinition(Protocol):
    func: Callable[..., Any]  # the user's ``def f(s, ...)``
    arg_names: list[str]  # its parameters after the state ``s``
    bind_arguments: dict[str, Any]  # values fixed by ``Function.bind``; call kwargs override
    num_api_spec_tokens: int | None  # API speculative execution's budget, None: off
