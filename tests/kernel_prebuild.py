"""Build the lower SIMD levels' CPU kernels in the background while other tests run.

A test that checks a level this CPU does not pick by itself (``portable``, ``avx2`` on an
AVX-512 VNNI machine) carries ``@pytest.mark.cpu_kernel_level(level)``. On a clean clone each
such level is a whole-module compile (about 3 minutes on 2 cores, cached afterwards by
plait/backends/cpu/build_cache.py), and it used to run inside the first test that asked for it
while the rest of the suite waited. Once collection is done, :func:`defer` moves the marked
tests to the end of the run and :func:`start` hands the levels they name to one child process at
the lowest CPU priority (``nice 19``: it only takes cycles the tests leave idle, and
timing-sensitive tests keep theirs); while a marked test runs, :func:`prioritize` gives the
build the tests' priority, since that test waits on it. The tests still call
``cpp_build.extension(level)`` themselves: a module already installed is loaded, one still
compiling is waited for on the build's own lock (never built twice), and one whose background
build failed or was stopped is built by the test, as before, failing there if it fails again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

MARKER = "cpu_kernel_level"
_BUILD = (
    "import sys\n"
    "from plait.backends.cpu import cpp_build\n"
    "for level in sys.argv[1:]:\n"
    "    cpp_build.extension(level)\n"
)


def levels_needed(items: list[pytest.Item]) -> list[str]:
    """The levels the collected tests mark, in the order the run reaches them, less those this
    CPU cannot run (their tests skip) and the best level (``make kernels`` built it)."""
    from plait.backends.cpu import cpp_build

    runnable = {"portable", *(["avx2"] if cpp_build.has_avx2() else [])}
    runnable |= {"avx512vnni"} if cpp_build.has_avx512_vnni() else set()
    order: list[str] = []
    for item in items:
        for mark in item.iter_markers(MARKER):
            level = mark.args[0]
            if level in runnable and level != cpp_build.best_level() and level not in order:
                order.append(level)
    return order


def _built(level: str) -> bool:
    from plait.backends.cpu import build_cache, cpp_build

    directory = build_cache.BuildEnv.current().directory(build_cache.default_root())
    return (directory / f"{cpp_build.module_name(level)}.so").exists()


def defer(items: list[pytest.Item]) -> None:
    """Where a marked level is not built yet, run the marked tests last (in their own order):
    the build then has the whole run's idle cycles instead of the first minutes'. They share no
    module-scoped state with the tests they leave behind."""
    if any(not _built(level) for level in levels_needed(items)):
        marked = [item for item in items if item.get_closest_marker(MARKER)]
        items[:] = [item for item in items if not item.get_closest_marker(MARKER)] + marked


def start(items: list[pytest.Item]) -> subprocess.Popen | None:
    """One niced child building the marked levels one after another; None where there is
    nothing to build or no compiler (the marked tests skip then)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return None
    levels = [level for level in levels_needed(items) if not _built(level)]
    if not levels:
        return None
    return subprocess.Popen(
        [sys.executable, "-c", _BUILD, *levels],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # two compilers at a time (a compile of torch's headers holds ~1 GB); the compile's time
        # limit (build_cache.py, 20 min) counts the niced minutes too, so it gets 2 hours here
        env={"MAX_JOBS": "2", "PLAIT_KERNEL_BUILD_TIMEOUT": "7200", **os.environ},
        preexec_fn=lambda: os.nice(19),
    )


def _tree(root: int) -> list[int]:
    """``root`` and every live descendant (Linux's /proc; the compile worker leads a session of
    its own, but stays a descendant)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError):  # not a process, or gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def prioritize(proc: subprocess.Popen | None, now: bool) -> None:
    """While a marked test runs it waits on the build: give the build the priority of the tests
    (``now``), and back to ``nice 19`` after. Raising a priority needs root (CAP_SYS_NICE, as a
    CI container has); elsewhere the build keeps ``nice 19`` and only takes longer."""
    if proc is None or proc.poll() is not None:
        return
    for pid in _tree(proc.pid):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, 0 if now else 19)
        except OSError:  # gone, or not allowed to raise it
            pass


def stop(proc: subprocess.Popen | None) -> None:
    """End a build still running when the session ends (its compile worker ends its compilers
    with it, PR_SET_PDEATHSIG; the next start takes the dead build's lock over)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
