"""One OpenMP team per engine: threads other than the one running forwards run torch with one
thread.

Why: libgomp (torch's OpenMP runtime) keeps a team of worker threads for every thread that has
started a parallel region, and once it manages more threads than the process has CPUs it cuts
its workers' spin-wait from ~300,000 iterations to 100, so they sleep and are woken through the
kernel at every parallel region. On the 2-core development machine a thread that had loaded the
model (its own team) made every kernel of the forward thread markedly slower, with two context
switches per call (``perf stat``; docs/cpu-backend.md, "One OpenMP team per engine", has the
figures). libgomp counts the process's first thread as managed from the start, so on a 2-CPU machine any team besides the forward thread's trips
the throttle. So the engine builds itself and runs its scheduler loop under
:func:`one_thread_here`, which first frees the calling thread's team if it has one (a
``torch.set_num_threads`` call or any parallel op before the engine starts one), and only the
forward thread owns a team.

What holds: the calling thread's team size is restored on exit, but not its team: its next
parallel op starts a new one, and from then on the engine's forwards are throttled again, so
torch work on the caller's own thread while an engine serves still slows the engine down.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

from plait.backends.cpu import cpp_build

log = logging.getLogger(__name__)


def set_thread_parallelism(threads: int, mkl_threads: int = 0) -> bool:
    """Parallel regions the calling thread starts from now on use ``threads`` threads, MKL's
    ``mkl_threads`` (0: MKL's process-wide count, which ``torch.set_num_threads`` sets); False
    (with a warning) where the helper cannot be compiled here."""
    try:
        ext = cpp_build.extension().thread_control
    except Exception as e:  # a missing compiler surfaces as several error types
        log.warning("per-thread OpenMP control unavailable (%s)", e)
        return False
    ext.set_thread_parallelism(threads, mkl_threads)
    return True


def release_team() -> bool:
    """Free the calling thread's OpenMP team workers, if it has any (``omp_pause_resource_all``);
    False where the helper is unavailable or the runtime refused (inside a parallel region)."""
    try:
        ext = cpp_build.extension().thread_control
    except Exception as e:  # a missing compiler surfaces as several error types
        log.warning("per-thread OpenMP control unavailable (%s)", e)
        return False
    return bool(ext.release_team())


@contextlib.contextmanager
def one_thread_here() -> Iterator[None]:
    """Run the body with one OpenMP thread on the calling thread and no team of its own (one it
    had is freed), then restore its thread count."""
    before = torch.get_num_threads()
    release_team()
    changed = set_thread_parallelism(1, mkl_threads=1)
    try:
        yield
    finally:
        if changed:
            set_thread_parallelism(before)
