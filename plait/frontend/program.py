"""A program: ``@pl.function def f(s, ...)``, and how its keyword arguments split into
program arguments and the run's default sampling parameters."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from plait.frontend.batch import cache_program, run_program_batch
from plait.frontend.compiler import CompiledFunction
from plait.frontend.interpreter import run_program
from plait.frontend.ir import split_sampling_kwargs
from plait.frontend.tracer import trace_program


class Function:
    """A program: ``@pl.function def f(s, ...)``. Calling it runs it on the default backend."""

    def __init__(
        self,
        func: Callable[..., Any],
        bind_arguments: dict[str, Any] | None = None,
        num_api_spec_tokens: int | None = None,
    ):
        params = list(inspect.signature(func).parameters.values())
        if not params:
            raise ValueError("a @function program must take the state `s` as its first argument")
        self.func = func
        self.arg_names = [p.name for p in params[1:]]
        self.bind_arguments = dict(bind_arguments or {})
        self.num_api_spec_tokens = num_api_spec_tokens
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> "Function":
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise ValueError(f"bind: {unknown} are not arguments of {self.__name__}")
        return Function(self.func, {**self.bind_arguments, **kwargs}, self.num_api_spec_tokens)

    def run(self, *args: Any, stream: bool = False, backend: Any = None, **kwargs: Any) -> Any:
        """Run once. ``kwargs`` are program arguments or default sampling parameters
        (``max_new_tokens``, ``temperature``, ...). Returns the :class:`ProgramState`."""
        program_kwargs, defaults = split_sampling_kwargs(kwargs)
        return run_program(self, backend, args, program_kwargs, defaults, stream=stream)

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
        """Run once per entry of ``batch_kwargs`` (dicts, or tuples of positional args),
        concurrently, after prefilling the program's traced shared prefix once. Returns the
        states in input order; with ``generator_style`` as an iterator that yields each
        state once it (and those before it) finished, instead of one list at the end."""
        extra, defaults = split_sampling_kwargs(sampling)
        if extra:
            raise ValueError(f"run_batch: unknown keyword(s) {sorted(extra)}")
        batch = [self._as_kwargs(a) for a in batch_kwargs]
        return run_program_batch(
            self,
            backend,
            batch,
            defaults,
            num_threads=num_threads,
            progress_bar=progress_bar,
            generator_style=generator_style,
        )

    def trace(self, *, backend: Any = None, **kwargs: Any) -> Any:
        """Run the program on placeholders and record its static prefix (see tracer)."""
        return trace_program(self, kwargs, backend)

    def compile(self, *, backend: Any = None, code_movement: bool = False) -> CompiledFunction:
        """This program as a graph (``plait.frontend.compiler``): its ``run``/``run_batch``
        queue every node at once and prefill the static prefix before a batch.
        ``code_movement=True`` moves constant text ahead of variable text so more of each
        prompt is a shared prefix; it changes the prompt, so it is opt-in."""
        return CompiledFunction(
            self, backend=backend, code_movement=code_movement, name=self.__name__
        )

    def cache(self, backend: Any = None) -> str:
        """Prefill the traced prefix on the backend now; returns the prefix text."""
        return cache_program(self, backend)

    def _as_kwargs(self, item: Any) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        if isinstance(item, (list, tuple)) and len(item) <= len(self.arg_names):
            return dict(zip(self.arg_names, item))
        raise ValueError(
            f"run_batch: each item must be a dict or a tuple of at most "
            f"{len(self.arg_names)} arguments, got {item!r}"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)
