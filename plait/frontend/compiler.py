"""``Function.compile()``: a program as a graph, run without re-running its Python code.

SGLang's paper compiles programs "as a computational graph", which lets a runtime schedule
them as a whole and rewrite them. :class:`CompiledFunction` has the shape of SGLang's
(``sglang/lang/compiler.py``): ``run`` and ``run_batch`` taking the program's arguments and
the default sampling parameters. Compiling traces the program once (``plait.frontend.graph``);
a run queues every node of every stream at once (``plait.frontend.graph_executor``), so
independent ``gen``s go to the engine together, and ``run_batch`` prefills the graph's static
prefix once before the batch fans out. ``code_movement=True`` adds the code-movement pass
(``plait.frontend.code_movement``), which may change the prompt.

Without code movement a compiled run sends the same requests as the interpreted run, so with
greedy sampling their outputs are equal. A program whose Python depends on run-time values
cannot be a graph; ``compile`` refuses it with a ``ValueError`` naming the cause.
"""

from __future__ import annotations

import inspect
from typing import Any

from plait.frontend import ir
from plait.frontend.backends.base import resolve_backend
from plait.frontend.batch import run_program_batch
from plait.frontend.code_movement import move_constants_first
from plait.frontend.definition import ProgramDefinition
from plait.frontend.global_config import global_config
from plait.frontend.graph import ProgramGraph, trace_graph
from plait.frontend.graph_executor import launch
from plait.frontend.ir import split_sampling_kwargs
from plait.frontend.state import ProgramState
from plait.frontend.tracer import _static_prefix

PRECACHE_MIN_CHARS = 64  # a shorter static prefix is not worth its own request


class CompiledFunction:
    """A program compiled into a graph. ``run``/``run_batch`` return ``ProgramState``s as the
    interpreted program's do (``ret_value`` stays ``None``: the Python ran at compile time)."""

    def __init__(
        self,
        program: ProgramDefinition,
        *,
        backend: Any = None,
        code_movement: bool = False,
        name: str = "program",
    ):
        if not isinstance(code_movement, bool):
            raise ValueError(f"code_movement must be a boolean, got {code_movement!r}")
        self.program = program
        self.backend = backend
        self.code_movement = code_movement
        self._defaults = {  # Python defaults of the program's arguments, for runs that omit them
            p.name: p.default
            for p in list(inspect.signature(program.func).parameters.values())[1:]
            if p.default is not inspect.Parameter.empty
        }
        graph = trace_graph(program, name)
        self.graph: ProgramGraph = move_constants_first(graph) if code_movement else graph

    # ---- running -----------------------------------------------------------------------
    def run(self, *args: Any, backend: Any = None, **kwargs: Any) -> ProgramState:
        """Run once; ``kwargs`` are program arguments or default sampling parameters."""
        program_kwargs, defaults = split_sampling_kwargs(kwargs)
        arguments = self._arguments(dict(zip(self.program.arg_names, args)), program_kwargs)
        return self._run_one(self._backend(backend), arguments, defaults)

    def run_batch(
        self,
        batch_kwargs: list[Any],
        *,
        backend: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        **sampling: Any,
    ) -> Any:
        """Run once per entry of ``batch_kwargs`` (dicts, or tuples of positional
        arguments), concurrently, after prefilling the graph's static prefix once."""
        extra, defaults = split_sampling_kwargs(sampling)
        if extra:
            raise ValueError(f"run_batch: unknown keyword(s) {sorted(extra)}")
        backend = self._backend(backend)
        batch = [self._arguments(*self._as_kwargs(item)) for item in batch_kwargs]
        return run_program_batch(
            self.program,
            backend,
            batch,
            defaults,
            num_threads=num_threads,
            progress_bar=progress_bar,
            generator_style=generator_style,
            run_one=self._run_one,
            precache=lambda: self.cache(backend),
        )

    def prefix(self, backend: Any = None) -> str:
        """The text every run starts with: the program stream's leading static nodes."""
        template = self._backend(backend).chat_template
        return _static_prefix(self.graph.nodes(0), template)

    def cache(self, backend: Any = None) -> str:
        """Prefill :meth:`prefix` now (when long enough to be worth it); returns it."""
        backend = self._backend(backend)
        prefix = self.prefix(backend)
        if len(prefix) >= PRECACHE_MIN_CHARS:
            backend.cache_prefix(prefix)
        return prefix

    def print_graph(self) -> None:
        """Each node as ``stream N: node`` in graph order (SGLang's ``print_graph``)."""
        for sid, node in self.graph.order:
            print(f"stream {sid:2d}: {node!r}")

    # ---- helpers -----------------------------------------------------------------------
    def _run_one(self, backend: Any, arguments: dict[str, Any], defaults: ir.GenParams) -> Any:
        executors = launch(self.graph, backend, arguments, defaults)
        for executor in executors:
            executor.sync()
        if global_config.verbosity >= 2 and executors[0].error_ is None:
            print(executors[0].text_)
        return ProgramState(executors[0])

    def _backend(self, backend: Any) -> Any:
        return resolve_backend(backend if backend is not None else self.backend)

    def _as_kwargs(self, item: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if isinstance(item, dict):
            return {}, item
        if isinstance(item, (list, tuple)) and len(item) <= len(self.program.arg_names):
            return dict(zip(self.program.arg_names, item)), {}
        raise ValueError(
            f"run_batch: each item must be a dict or a tuple of at most "
            f"{len(self.program.arg_names)} arguments, got {item!r}"
        )

    def _arguments(self, positional: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The run's arguments: bound, then positional, then keyword; all must be there."""
        unknown = sorted(set(kwargs) - set(self.program.arg_names))
        if unknown:
            raise ValueError(f"{unknown} are not arguments of the compiled program")
        arguments = {**self._defaults, **self.program.bind_arguments, **positional, **kwargs}
        missing = [n for n in self.program.arg_names if n not in arguments]
        if missing:
            raise ValueError(f"missing argument(s) {missing} of the compiled program")
        return arguments
