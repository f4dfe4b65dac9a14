"""The CPU backend's C++ builds (plait.backends.cpu.cpp_build)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler on this machine to build the kernels",
)

#: one start of the CPU backend's kernel build, as Engine() does it (the portable level)
# A one-function extension through the same cache, lock and compile worker as the kernels. The
# start that is killed compiles torch's headers (long enough to be killed in, whatever the load);
# the start after it builds the same module name from pybind11 alone (seconds, not the ~30 s of
# torch's headers): what it checks is the lock takeover, the install and the cleanup.
TINY_SOURCE = """#include <torch/extension.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("one", [] { return 1; }); }
"""
LIGHT_SOURCE = """#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("one", [] { return 1; }); }
"""
BUILD_ONE = (
    "import os; from pathlib import Path; from plait.backends.cpu import build_cache; "
    "m = build_cache.load('plait_build_probe', [Path(os.environ['PROBE_SOURCE'])], "
    "cflags=['-O1'], ldflags=[]); assert m.one() == 1; print('built')"
)
COMPILERS = {"cc1plus", "clang", "clang++"}


def test_make_kernels_builds_the_one_module_from_every_cpu_source():
    """``make kernels`` (``python -m plait.backends.cpu.cpp_build``) builds ahead what the CPU
    backend would otherwise compile on the first server start: one module from every C++ file
    of the csrc tree, a submodule per kernel, and no C++ outside that tree."""
    from plait.backends.cpu import cpp_build

    here = Path(cpp_build.__file__).parent
    assert set(cpp_build.sources()) == set(cpp_build.CSRC.rglob("*.cpp"))
    assert not [
        p
        for p in here.rglob("*")
        if p.suffix in (".cpp", ".h", ".cc", ".hpp") and cpp_build.CSRC not in p.parents
    ]
    assert cpp_build.build()
    module = cpp_build.extension()
    for kernel in (
        "panel_gemm",
        "qmatmul",
        "decode_attention",
        "greedy_head",
        "layer_step",
        "thread_control",
    ):
        assert hasattr(module, kernel), kernel
    assert module.simd_level() == cpp_build.best_level()


def test_an_edit_anywhere_in_the_tree_names_a_new_module(tmp_path, monkeypatch):
    """The cache finds a module by its name alone, so an edited header (which every unit that
    includes it compiles) must change the name, as an edited source does."""
    from plait.backends.cpu import cpp_build

    tree = tmp_path / "csrc"
    shutil.copytree(cpp_build.CSRC, tree)
    monkeypatch.setattr(cpp_build, "CSRC", tree)
    before = cpp_build.module_name("portable")
    header = tree / "include" / "plait_cpu" / "simd.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert cpp_build.module_name("portable") != before


def test_two_checkouts_of_one_tree_share_one_module(tmp_path, monkeypatch):
    """A copy of the same tree elsewhere (a git worktree, a CI clone) names the same module,
    so it reuses the build instead of compiling its own."""
    from plait.backends.cpu import cpp_build

    here = cpp_build.module_name("portable")
    tree = tmp_path / "elsewhere" / "csrc"
    shutil.copytree(cpp_build.CSRC, tree)
    monkeypatch.setattr(cpp_build, "CSRC", tree)
    assert cpp_build.module_name("portable") == here


def _processes_under(directory: Path) -> dict[int, str]:
    """pid -> command name of every process whose working directory is inside ``directory``
    (ninja and the compilers run in the build directory)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cwd = Path(os.readlink(proc / "cwd"))
            comm = (proc / "comm").read_text().strip()
        except OSError:  # not a process, gone, or not ours to read
            continue
        if cwd.is_relative_to(directory):
            found[int(proc.name)] = comm
    return found


def _wait_for(predicate, limit_s: float):
    """``predicate()``'s first true value within ``limit_s`` seconds, else its last value."""
    deadline = time.monotonic() + limit_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="watches compilers in /proc")
def test_a_start_killed_while_compiling_does_not_block_the_next_start(tmp_path):
    """Issue 32: a killed build left torch's lock file and every later start waited on it
    forever. Now the next start takes the dead start's lock over and builds; the killed
    start's compilers ended with it and it installed no half-built module. Builds go to
    tmp_path (PLAIT_KERNEL_DIR; TORCH_EXTENSIONS_DIR for torch's own directory)."""
    source = tmp_path / "probe.cpp"
    source.write_text(TINY_SOURCE)
    env = {
        **os.environ,
        "PLAIT_KERNEL_DIR": str(tmp_path / "plait"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch"),
        "OMP_NUM_THREADS": "1",
        "MAX_JOBS": "1",
        "PROBE_SOURCE": str(source),
    }
    first = subprocess.Popen(
        [sys.executable, "-c", BUILD_ONE],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        compiling = _wait_for(lambda: COMPILERS & set(_processes_under(tmp_path).values()), 300)
        assert compiling, "no compiler started for the first build"
        os.kill(first.pid, signal.SIGKILL)  # the start alone, as `kill -9` of an engine does
        first.wait(timeout=10)
        ended = _wait_for(lambda: not _processes_under(tmp_path), 20)
        leftover = {} if ended else _processes_under(tmp_path)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # whatever of its group is left
        except ProcessLookupError:
            pass
    assert not list(tmp_path.glob("plait/*/*.so")), "a killed build installed a module"

    light = tmp_path / "light.cpp"
    light.write_text(LIGHT_SOURCE)
    try:
        second = subprocess.run(
            [sys.executable, "-c", BUILD_ONE],
            env={**env, "PROBE_SOURCE": str(light)},
            timeout=420,
            capture_output=True,
            text=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the start after a killed build hung (waiting on the dead build's lock?)")
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip() == "built"
    [module] = tmp_path.glob("plait/*/plait_build_probe.so")
    assert not list(module.parent.glob(".build-*")), "the killed build's directory was left"
    assert not leftover, f"the killed start's build kept running: {leftover}"
