"""One OpenMP team per engine: threads other than the one running forwards run torch with one
thread.

Why: libgomp (torch's OpenMP runtime) keeps a team of worker threads for every thread that has
started a parallel region, and once it manages more threads than the process has CPUs it cuts
its workers' spin-wait from ~300,000 iterations to 100, so they sleep and are woken through the
kernel at every parallel region. On the 2-core development machine a thread that had loaded the
model (its own team) made every kernel of the forward thread ~1.7-2x slower: the VNNI
quantized matmul of SmolLM2's gate/up went from 49 to 91 us and two context switches appeared
per call (``perf stat``; see docs/benchmarks.md). So the engine loads the model and runs its
scheduler loop under :func:`one_thread_here`, and only the forward thread owns a team.

What holds: the calling thread's team size is restored on exit; a thread that already owns a
team keeps it (libgomp frees it only when the thread exits), so torch work done by the caller's
own thread before or around an engine still slows the engine's forwards down.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from plait.backends.cpu import cpp_build

log = logging.getLogger(__name__)


def set_thread_parallelism(threads: int) -> bool:
    """Parallel regions the calling thread starts from now on use ``threads`` threads; False
    (with a warning) where the helper cannot be compiled here."""
    try:
        ext = cpp_build.extension("thread_control.cpp")
    except Exception as e:  # a missing compiler surfaces as several error types
        log.warning("per-thread OpenMP control unavailable (%s)", e)
        return False
    ext.set_thread_parallelism(threads)
    return True


@contextlib.contextmanager
def one_thread_here() -> Iterator[None]:
    """Run the body with one OpenMP thread on the calling thread, then restore its count."""
    before = torch.get_num_threads()
    changed = set_thread_parallelism(1)
    try:
        yield
    finally:
        if changed:
            set_thread_parallelism(before)
