"""A program as a graph: its expressions per stream, traced once on placeholder arguments.

``Function.compile()`` runs the program's Python code a single time against
:class:`GraphTracerState` (no model is called). Every ``s += ...`` is recorded as a node of
the state's *stream*; ``s.fork(n)`` opens ``n`` child streams that start from the parent's
text at the fork; ``s["x"]`` and ``forks[i]["x"]`` become :class:`VarRef` nodes (the
variable's text, read when the run gets there); ``join`` is a node of the parent. The graph
is the nodes of all streams in the order the program appended them, which is a topological
order: a node that reads a variable comes after the node that writes it.

What cannot be a graph is refused with a ``ValueError`` naming the cause: control flow that
depends on a generated value or on an argument's value (an f-string, ``str(q)``, ``if q``),
``s.text()``/``s.messages()``/``get_meta_info`` during the program, ``set_var``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from plait.frontend import ir
from plait.frontend.definition import ProgramDefinition
from plait.frontend.ir import StopTracing
from plait.frontend.roles import RoleMethods


class VarRef(ir.Argument):
    """The text of variable ``name`` of stream ``stream``, known only at run time. Like an
    argument placeholder, using it as a Python value ends the trace."""

    def __init__(self, stream: int, name: str):
        super().__init__(name)
        self.__dict__["stream"] = stream

    def __repr__(self) -> str:
        return f"VarRef({self.__dict__['stream']}, {self.__dict__['name']!r})"


class ForkNode(ir.Expr):
    """On the parent: the children start here, with the parent's text, roles and variables."""

    def __init__(self, children: list[int]):
        self.children = children

    def __repr__(self) -> str:
        return f"Fork({self.children})"


class JoinNode(ir.Expr):
    """On the parent: wait for the children, then gather their new variables (as lists, one
    entry per child) or append their new text (``concate_and_append``)."""

    def __init__(self, children: list[int], mode: str, names: list[str]):
        self.children = children
        self.mode = mode
        self.names = names  # variables the children created (gather_variable writes them)

    def __repr__(self) -> str:
        return f"Join({self.children}, {self.mode!r})"


@dataclass
class Stream:
    parent: int | None = None  # the stream it was forked from (None: the program's own)
    produced: list[str] = field(default_factory=list)  # variables its own nodes write


@dataclass
class ProgramGraph:
    """Streams and their nodes; ``order`` holds ``(stream, node)`` in the order appended."""

    arg_names: list[str]
    streams: list[Stream] = field(default_factory=lambda: [Stream()])
    order: list[tuple[int, ir.Expr]] = field(default_factory=list)

    def nodes(self, stream: int) -> list[ir.Expr]:
        return [node for sid, node in self.order if sid == stream]


class GraphTracerState(RoleMethods):
    """Stands in for ``ProgramState`` while compiling: records nodes, never calls a model."""

    def __init__(self, graph: ProgramGraph, stream: int):
        self.graph = graph
        self.stream = stream

    def __iadd__(self, other: Any) -> "GraphTracerState":
        if other is None:
            raise ValueError("cannot append None to a program state")
        expr = ir.to_expr(other)
        for node in expr.exprs if isinstance(expr, ir.ExprList) else [expr]:
            self._record(node)
        return self

    def _append(self, expr: ir.Expr) -> None:
        self += expr

    def _record(self, node: ir.Expr) -> None:
        if isinstance(node, ir.ConcatAndAppend):
            raise StopTracing("a join of states from another run")
        produced = self.graph.streams[self.stream].produced
        if isinstance(node, (ir.Gen, ir.Select)) and node.name is not None:
            produced.append(node.name)
        elif isinstance(node, ir.VarScopeBegin):
            produced.append(node.name)
        elif isinstance(node, ir.SeparateReasoning):
            produced.extend([*node.names, *map(node.reasoning_name, node.names)])
        self.graph.order.append((self.stream, node))

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        self._record(ir.VarScopeBegin(name))
        yield
        self._record(ir.VarScopeEnd(name))

    def get_var(self, name: str) -> VarRef:
        if name not in self._visible():
            raise StopTracing(f"variable {name!r} is read before any node writes it")
        return VarRef(self.stream, name)

    __getitem__ = get_var

    def _visible(self) -> set[str]:
        names: set[str] = set()
        sid: int | None = self.stream
        while sid is not None:
            names.update(self.graph.streams[sid].produced)
            sid = self.graph.streams[sid].parent
        return names

    def fork(self, size: int = 1) -> "GraphTracerGroup":
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"fork size must be a positive integer, got {size!r}")
        children = []
        for _ in range(size):
            self.graph.streams.append(Stream(parent=self.stream))
            children.append(len(self.graph.streams) - 1)
        self.graph.order.append((self.stream, ForkNode(children)))
        return GraphTracerGroup([GraphTracerState(self.graph, c) for c in children], self)

    @contextmanager
    def copy(self) -> Iterator["GraphTracerState"]:
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def _run_time_only(self, what: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise StopTracing(f"the program calls s.{what}(), known only at run time")

        return refuse

    def __getattr__(self, name: str) -> Any:
        if name in ("text", "messages", "get_meta_info", "text_iter", "text_async_iter", "set_var"):
            return self._run_time_only(name)
        raise AttributeError(name)

    def __setitem__(self, name: str, value: Any) -> None:
        raise StopTracing("the program sets a variable (s[name] = ...) from Python")

    def sync(self) -> None:
        pass

    def error(self) -> None:
        return None


class GraphTracerGroup:
    """The traced branches of ``s.fork(n)``: the same surface as ``ProgramStateGroup``."""

    def __init__(self, states: list[GraphTracerState], parent: GraphTracerState):
        self.states = states
        self.parent = parent
        self.joined = False

    def join(self, mode: str = "gather_variable") -> None:
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(
                f"mode must be 'gather_variable' or 'concate_and_append', got {mode!r}"
            )
        graph = self.parent.graph
        children = [s.stream for s in self.states]
        names = sorted({n for c in children for n in graph.streams[c].produced})
        self.parent._record(JoinNode(children, mode, names))
        if mode == "gather_variable":
            graph.streams[self.parent.stream].produced.extend(names)

    def __getitem__(self, i: int) -> GraphTracerState:
        return self.states[i]

    def __setitem__(self, i: int, value: GraphTracerState) -> None:
        if value is not self.states[i]:
            raise ValueError("fork branches cannot be replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[GraphTracerState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> "GraphTracerGroup":
        for i, state in enumerate(self.states):
            if isinstance(other, (list, tuple)):
                if len(other) != len(self.states):
                    raise ValueError(
                        f"need {len(self.states)} items, one per branch, got {len(other)}"
                    )
                state += other[i]
            elif callable(other) and not isinstance(other, ir.Expr):
                state += other(i)
            else:
                state += other
        return self


def trace_graph(program: ProgramDefinition, name: str = "program") -> ProgramGraph:
    """Trace ``program`` into a graph; ``ValueError`` says why one cannot be built."""
    graph = ProgramGraph(arg_names=list(program.arg_names))
    arguments: dict[str, Any] = {n: ir.Argument(n) for n in program.arg_names}
    arguments.update(program.bind_arguments)
    try:
        program.func(GraphTracerState(graph, 0), **arguments)
    except StopTracing as e:
        raise ValueError(f"compile: {name} cannot be compiled into a graph: {e}") from None
    except Exception as e:  # noqa: BLE001 - placeholders break user code in many ways
        raise ValueError(
            f"compile: {name} cannot be compiled into a graph: {type(e).__name__}: {e}"
        ) from e
    return graph
