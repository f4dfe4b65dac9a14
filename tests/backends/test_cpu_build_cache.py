"""The kernel build cache and its lock (plait.backends.cpu.build_cache, build_lock): a killed
lock's owner dying frees it, a wait is bounded, two interpreters never share a build, and a
module is installed whole. (A killed build of the real kernels: test_cpu_build.py.)

Every build here goes to a temporary root, never to the shared default directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from plait.backends.cpu import build_lock as build_lock_module
from plait.backends.cpu.build_cache import BuildEnv, load
from plait.backends.cpu.build_lock import BuildLockTimeout, build_lock

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler on this machine"
)

#: a CPython module with no torch headers: compiles in about a second
TINY_SOURCE = r"""
#include <Python.h>
#define PLAIT_STR2(x) #x
#define PLAIT_STR(x) PLAIT_STR2(x)
#define PLAIT_CAT2(a, b) a##b
#define PLAIT_CAT(a, b) PLAIT_CAT2(a, b)
static PyModuleDef def = {PyModuleDef_HEAD_INIT, PLAIT_STR(TORCH_EXTENSION_NAME), nullptr, -1};
PyMODINIT_FUNC PLAIT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject *m = PyModule_Create(&def);
  if (m != nullptr) PyModule_AddIntConstant(m, "ANSWER", 42);
  return m;
}
"""

#: loads build_lock.py (argv[1]) alone, without importing plait (seconds on a busy machine),
#: takes the lock at argv[2], says so, then sleeps until killed
HOLD_LOCK = """
import importlib.util, pathlib, sys, time
spec = importlib.util.spec_from_file_location("build_lock", sys.argv[1])
build_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_lock)
with build_lock.build_lock(pathlib.Path(sys.argv[2]), timeout_s=5):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def lock_holder(tmp_path):
    """A live process holding the lock at ``tmp_path / "k.lock"``."""
    path = tmp_path / "k.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, build_lock_module.__file__, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "held\n"
        yield path, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_waiter_gives_up_after_its_timeout_naming_the_lock_and_its_owner(lock_holder):
    path, proc = lock_holder
    start = time.monotonic()
    with pytest.raises(BuildLockTimeout) as err, build_lock(path, timeout_s=1.0):
        pytest.fail("took a lock that a live process holds")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert str(path) in message and f"pid {proc.pid}" in message
    assert "PLAIT_KERNEL_BUILD_TIMEOUT" in message


def test_a_lock_whose_owner_was_killed_is_taken_over_at_once(lock_holder):
    path, proc = lock_holder
    proc.kill()
    proc.wait()
    assert json.loads(path.read_text())["pid"] == proc.pid  # the dead owner's record stays
    start = time.monotonic()
    with build_lock(path, timeout_s=30):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert time.monotonic() - start < 2


def test_two_interpreters_or_torch_builds_get_different_build_directories(tmp_path):
    here = BuildEnv.current()
    other_venv = dataclasses.replace(
        here, prefix="/srv/other-venv", executable="/srv/other-venv/bin/python"
    )
    other_torch = dataclasses.replace(here, torch_git="0" * 40)
    other_abi = dataclasses.replace(here, cxx11_abi=not here.cxx11_abi)
    directories = {env.directory(tmp_path) for env in (here, other_venv, other_torch, other_abi)}
    assert len(directories) == 4
    assert BuildEnv.current().directory(tmp_path) == here.directory(tmp_path)
    assert all(d.parent == tmp_path for d in directories)


@needs_compiler
def test_a_built_module_is_installed_whole_then_loaded_from_the_cache(tmp_path):
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    root = tmp_path / "root"
    assert load("plait_test_tiny", [source], cflags=[], ldflags=[], root=root).ANSWER == 42
    [module] = root.glob("*/plait_test_tiny.so")
    assert not list(module.parent.glob(".build-*"))
    installed = module.stat().st_mtime_ns
    source.write_text("this would not compile")  # a cached module is not rebuilt
    assert load("plait_test_tiny", [source], cflags=[], ldflags=[], root=root).ANSWER == 42
    assert module.stat().st_mtime_ns == installed


@needs_compiler
def test_a_failed_build_says_why_and_installs_nothing(tmp_path):
    source = tmp_path / "broken.cpp"
    source.write_text("int broken( {\n")
    root = tmp_path / "root"
    with pytest.raises(RuntimeError, match="plait_test_broken"):
        load("plait_test_broken", [source], cflags=[], ldflags=[], root=root)
    [directory] = root.iterdir()
    assert not list(directory.glob("*.so")) and not list(directory.glob(".build-*"))


@pytest.mark.parametrize("raw", ["soon", "0", "-5"])
def test_a_bad_build_timeout_is_refused_naming_the_variable(monkeypatch, raw):
    from plait.backends.cpu.build_cache import timeout_s

    monkeypatch.setenv("PLAIT_KERNEL_BUILD_TIMEOUT", raw)
    with pytest.raises(ValueError, match="PLAIT_KERNEL_BUILD_TIMEOUT"):
        timeout_s()


@needs_compiler
def test_a_build_over_its_time_limit_is_ended_whole(tmp_path, monkeypatch):
    """The compile is bounded too: past PLAIT_KERNEL_BUILD_TIMEOUT its whole session ends (the
    worker, ninja, the compilers) and nothing is installed."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    root = tmp_path / "root"
    monkeypatch.setenv("PLAIT_KERNEL_BUILD_TIMEOUT", "0.5")  # less than the worker's start
    with pytest.raises(RuntimeError, match="took over 0.5 s"):
        load("plait_test_slow", [source], cflags=[], ldflags=[], root=root)
    [directory] = root.iterdir()
    assert not list(directory.glob("*.so")) and not list(directory.glob(".build-*"))
    if os.path.isdir("/proc"):
        cwds = []
        for proc in os.listdir("/proc"):
            try:
                cwds.append(os.readlink(f"/proc/{proc}/cwd"))
            except OSError:
                continue
        assert not [cwd for cwd in cwds if cwd.startswith(str(root))]
