"""Running one program over many inputs: ``run_batch``, plain or as a generator.

Both first prefill the program's traced shared prefix once (``global_config``'s
``enable_precache_with_tracing``), so the instances fan out from a warm radix cache instead of
racing to compute the same tokens.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

from plait.frontend import ir
from plait.frontend.backends.base import resolve_backend
from plait.frontend.definition import ProgramDefinition
from plait.frontend.global_config import global_config
from plait.frontend.interpreter import run_program
from plait.frontend.tracer import trace_program

RunOne = Callable[[Any, dict[str, Any], ir.GenParams], Any]  # (backend, kwargs, defaults)


def run_program_batch(
    program: ProgramDefinition,
    backend: Any,
    batch: list[dict[str, Any]],
    defaults: ir.GenParams,
    num_threads: int | str = "auto",
    progress_bar: bool = False,
    generator_style: bool = False,
    run_one: RunOne | None = None,
    precache: Callable[[], Any] | None = None,
) -> Any:
    """Run the program once per kwargs dict, concurrently. Returns the states in input order:
    a list, or with ``generator_style`` an iterator that yields each state as soon as it and
    those before it have finished (SGLang's order, so ``zip`` with the inputs holds).
    ``run_one(backend, kwargs, defaults)`` runs one instance (default: the interpreter) and
    ``precache()`` warms the shared prefix (default: the traced static prefix)."""
    backend = resolve_backend(backend)
    if num_threads == "auto":
        num_threads = max(64, 16 * (os.cpu_count() or 1))
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be 'auto' or a positive integer, got {num_threads!r}")
    if len(batch) > 1 and global_config.enable_precache_with_tracing:
        precache() if precache is not None else cache_program(program, backend)
    if run_one is None:
        run_one = lambda b, kwargs, d: run_program(program, b, (), kwargs, d)  # noqa: E731
    num_threads = max(1, min(num_threads, len(batch)))
    states = _iter_batch(run_one, backend, batch, defaults, num_threads, progress_bar)
    return states if generator_style else list(states)


def _iter_batch(
    run_one: RunOne,
    backend: Any,
    batch: list[dict[str, Any]],
    defaults: ir.GenParams,
    num_threads: int,
    progress_bar: bool,
) -> Iterator[Any]:
    """Keep ``2 * num_threads`` programs submitted ahead of the consumer: the pool never
    idles while the caller handles a result, and a huge batch is not all queued at once."""
    bar = _progress_bar(len(batch)) if progress_bar else None
    todo = iter(batch)
    pending: deque[Future] = deque()
    try:
        with ThreadPoolExecutor(num_threads, thread_name_prefix="plait-batch") as pool:

            def submit_next() -> None:
                kwargs = next(todo, None)
                if kwargs is not None:
                    future = pool.submit(run_one, backend, kwargs, defaults)
                    if bar is not None:
                        future.add_done_callback(lambda _: bar.update())
                    pending.append(future)

            for _ in range(2 * num_threads):
                submit_next()
            while pending:
                state = pending.popleft().result()
                submit_next()
                yield state
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(total: int) -> Any:
    import tqdm

    return tqdm.tqdm(total=total)


def cache_program(program: ProgramDefinition, backend: Any, min_chars: int = 64) -> str:
    """Prefill the program's traced static prefix once, so a batch fans out from a warm
    radix cache. Short prefixes are not worth a request. Returns the prefix."""
    backend = resolve_backend(backend)
    prefix = trace_program(program, {}, backend).prefix
    if len(prefix) >= min_chars:
        backend.cache_prefix(prefix)
    return prefix
