"""``ProgramState`` (the ``s`` a program receives and ``run`` returns) and the fork group.

Thin, SGLang-named wrappers over :class:`plait.frontend.interpreter.StreamExecutor`, which holds
the text, messages and variables and does the work.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Any, AsyncIterator, Callable, Iterator

from plait.frontend import ir
from plait.frontend.roles import RoleMethods


class ProgramState(RoleMethods):
    def __init__(self, executor: Any):
        self.stream_executor = executor
        self.ret_value: Any = None

    # ---- building the program -------------------------------------------------------------
    def __iadd__(self, other: Any) -> "ProgramState":
        if other is None:
            raise ValueError("cannot append None to a program state")
        self.stream_executor.submit(other)
        return self

    def _append(self, expr: ir.Expr) -> None:
        self.stream_executor.submit(expr)

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        """Everything appended inside the block becomes variable ``name``."""
        self.stream_executor.submit(ir.VarScopeBegin(name))
        yield
        self.stream_executor.submit(ir.VarScopeEnd(name))

    def fork(self, size: int = 1) -> "ProgramStateGroup":
        """``size`` branches that continue from the current text; they run concurrently and
        share the prefix's KV cache (it is prefilled once before they start)."""
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    @contextmanager
    def copy(self) -> Iterator["ProgramState"]:
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ---- reading results ------------------------------------------------------------------
    def _synced(self) -> Any:
        self.stream_executor.sync()
        self.stream_executor.raise_if_failed()
        return self.stream_executor

    def text(self) -> str:
        return self._synced().text_

    def messages(self) -> list[dict[str, str]]:
        return list(self._synced().messages_)

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        """The exception that stopped the program, or ``None``."""
        self.stream_executor.sync()
        return self.stream_executor.error_

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        return self.stream_executor.get_meta_info(name)

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Chunks of the whole text (or of one variable) as they are generated."""
        return self.stream_executor.iter_chunks(var_name)

    def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:

        return aiter_chunks(self.stream_executor, var_name)

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def __repr__(self) -> str:
        exe = self.stream_executor
        return f"ProgramState({exe.text_!r}{', error=' + repr(exe.error_) if exe.error_ else ''})"


class ProgramStateGroup:
    """The branches of ``s.fork(n)``: index them, ``+=`` to all, then ``join()``."""

    def __init__(self, states: list[ProgramState], parent: ProgramState):
        self.states = states
        self.parent = parent

    def join(self, mode: str = "gather_variable") -> None:
        """``gather_variable``: each variable the branches created appears on the parent as
        a list, one entry per branch. ``concate_and_append``: the parent's text grows by
        every branch's new text, in branch order."""
        executors = [s.stream_executor for s in self.states]
        try:
            self._join(executors, mode)
        finally:
            for child in executors:
                child.end()

    def _join(self, executors: list[Any], mode: str) -> None:
        if mode == "gather_variable":
            parent = self.parent.stream_executor
            before = set(parent.variables)
            for child in executors:
                child.sync()
                child.raise_if_failed()
            with parent._cv:
                for child in executors:
                    for name in child.variables.keys() - before:
                        parent.variables.setdefault(name, []).append(child.variables[name])
                        parent.meta_info.setdefault(name, []).append(child.meta_info.get(name))
        elif mode == "concate_and_append":
            self.parent.stream_executor.submit(ir.ConcatAndAppend(executors))
            self.parent.stream_executor.sync()
        else:
            raise ValueError(
                f"mode must be 'gather_variable' or 'concate_and_append', got {mode!r}"
            )

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        # `forks[i] += x` assigns the (same) state back; anything else is a mistake
        if value is not self.states[i]:
            raise ValueError("fork branches cannot be replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> "ProgramStateGroup":
        """``forks += expr`` (same for all), a list (one per branch) or ``lambda i: ...``."""
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"need {len(self.states)} items, one per branch, got {len(other)}")
            items: Callable[[int], Any] = lambda i: other[i]
        elif callable(other) and not isinstance(other, ir.Expr):
            items = other
        else:
            items = lambda i: other
        for i, state in enumerate(self.states):
            state += items(i)
        return self


async def aiter_chunks(executor: Any, var: str | None) -> AsyncIterator[str]:
    """The async face of ``StreamExecutor.iter_chunks`` (waits in a worker thread)."""
    loop = asyncio.get_running_loop()
    it = executor.iter_chunks(var)
    done = object()
    while True:
        chunk = await loop.run_in_executor(None, next, it, done)
        if chunk is done:
            return
        yield chunk
