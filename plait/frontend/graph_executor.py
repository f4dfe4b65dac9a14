"""Running a compiled program's graph: one executor per stream, every node queued at once.

The interpreter runs a program's Python code and queues each expression as the code reaches
it, so a branch's work waits for the Python that precedes it (``s["x"]`` blocks the program's
thread). A compiled program has no Python left to run: :func:`launch` queues all nodes of all
streams before any result exists, each stream drains its own queue on its own worker, and
a node waits only for what it reads. Independent ``gen``s (of different fork branches, of
different programs in a batch) therefore reach the engine together.
"""

from __future__ import annotations

import threading
from typing import Any

from plait.frontend import ir
from plait.frontend.graph import ForkNode, JoinNode, ProgramGraph, VarRef
from plait.frontend.interpreter import StreamExecutor


class AwaitFork(ir.Expr):
    """A child stream's first node: wait until the parent reaches the fork."""


class GraphExecutor(StreamExecutor):
    """A :class:`StreamExecutor` that also executes the graph's nodes: fork, join and
    variable references to other streams."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.streams: list[GraphExecutor] = []  # every stream of this run, by index
        self.forked = threading.Event()  # set once this stream has its starting state
        self.fork_children: list[GraphExecutor] = []  # streams this one starts, not yet started

    def submit(self, expr: Any) -> None:
        if isinstance(expr, JoinNode) and expr.mode == "gather_variable":
            with self._cv:  # readers of the gathered lists wait for the join
                for name in expr.names:
                    self._pending[name] = self._pending.get(name, 0) + 1
        super().submit(expr)

    def fail(self, error: BaseException) -> None:
        """Also fail the branches this stream would have started: they would wait forever."""
        super().fail(error)
        for child in self.fork_children:
            if not child.forked.is_set():
                child.fail(error)
                child.forked.set()

    def get_var(self, name: str) -> Any:
        self.forked.wait()  # an inherited variable is there once the stream has started
        return super().get_var(name)

    def _execute(self, expr: ir.Expr) -> None:
        if isinstance(expr, VarRef):
            source = self.streams[expr.__dict__["stream"]]
            self._fill(str(source.get_var(expr.__dict__["name"])))
        elif isinstance(expr, AwaitFork):
            self.forked.wait()
            self.raise_if_failed()
        elif isinstance(expr, ForkNode):
            self._start_children([self.streams[c] for c in expr.children])
        elif isinstance(expr, JoinNode):
            self._join([self.streams[c] for c in expr.children], expr)
        else:
            super()._execute(expr)

    def _start_children(self, children: list["GraphExecutor"]) -> None:
        """What ``StreamExecutor.fork`` does, into executors that already hold their nodes."""
        if len(children) > 1 and self.text_:
            self.backend.cache_prefix(self.text_)  # the branches then find the prefix cached
        for child in children:
            with child._cv:
                child.variables.update(self.variables)
                child.text_ = self.text_
                child.messages_ = list(self.messages_)
                child.cur_role, child.cur_role_begin_pos = self.cur_role, self.cur_role_begin_pos
                child.fork_start_text_pos = len(self.text_)
            child.forked.set()

    def _join(self, children: list["GraphExecutor"], expr: JoinNode) -> None:
        if expr.mode == "concate_and_append":
            super()._execute(ir.ConcatAndAppend(children))
            return
        for child in children:
            child.sync()
            child.raise_if_failed()
        with self._cv:
            before = set(self.variables)
            for child in children:
                for name in child.variables.keys() - before:
                    self.variables.setdefault(name, []).append(child.variables[name])
                    self.meta_info.setdefault(name, []).append(child.meta_info.get(name))
            for name in expr.names:
                left = self._pending.pop(name, 0) - 1
                if left > 0:
                    self._pending[name] = left
            self._cv.notify_all()


def launch(
    graph: ProgramGraph,
    backend: Any,
    arguments: dict[str, Any],
    defaults: ir.GenParams,
) -> list[GraphExecutor]:
    """Start one run of ``graph``: an executor per stream, all nodes queued, in graph order
    (a writer's node is queued before its readers', so no read can miss a pending write).
    Returns the executors, the program's own first; each has been told no more will come."""
    executors = [
        GraphExecutor(backend, arguments, defaults, backend.chat_template, False)
        for _ in graph.streams
    ]
    executors[0].forked.set()
    for i, stream in enumerate(graph.streams):
        executors[i].streams = executors
        if stream.parent is not None:
            executors[stream.parent].fork_children.append(executors[i])
            executors[i].submit(AwaitFork())
    try:
        for sid, node in graph.order:
            executors[sid].submit(_bind(node, arguments))
    except BaseException as e:  # noqa: BLE001 - surfaced on the state, as in the interpreter
        executors[0].fail(e)
    finally:
        for executor in executors:
            executor.end()
    return executors


def _bind(node: ir.Expr, arguments: dict[str, Any]) -> ir.Expr:
    """An argument placeholder becomes the argument's value (as ``s += value`` would)."""
    if isinstance(node, ir.Argument) and not isinstance(node, VarRef):
        return ir.to_expr(arguments[node.__dict__["name"]])
    return node
