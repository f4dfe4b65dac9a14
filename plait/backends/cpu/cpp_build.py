"""Compile the CPU backend's C++ kernels once, as one module per CPU feature level (cached on
disk by :mod:`.build_cache`, so later processes only load the .so).

The tree (``csrc/``, beside this file)::

    include/plait_cpu/*.h   declarations and small inlines, one header per kernel
    src/*.cpp               one translation unit per kernel
    bindings.cpp            the one PYBIND11_MODULE: a submodule per kernel

Dispatch per CPU feature level (:data:`LEVELS`, from least to most demanding):

- ``portable``: no SIMD flags (the sources' plain loops);
- ``avx2``: ``-mavx2 -mfma -mf16c``, where torch reports AVX2 or AVX512 on x86-64;
- ``avx512vnni``: ``avx2`` plus AVX-512 F/BW/VL/DQ and VNNI, where the CPU also has VNNI
  (e.g. AMD Zen 4, Intel Cascade Lake and later). Sources with nothing for it compile their
  AVX2 path under it.

Each level's build has its own name, so their caches never collide. The name also carries a
digest of the whole ``csrc`` tree and the flags: the cache finds a module by name alone, so an
edited source or flag must change the name.

Where the modules live (``$PLAIT_KERNEL_DIR``, default ``~/.cache/plait/kernels``, one
directory per interpreter and torch build), how a killed build is survived (a lock its dead
owner cannot keep, an atomic install) and the time limits (``$PLAIT_KERNEL_BUILD_TIMEOUT``):
:mod:`plait.backends.cpu.build_cache`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from pathlib import Path
from types import ModuleType

import torch

from plait.backends.cpu import build_cache

LEVELS = ("portable", "avx2", "avx512vnni")
_FLAGS = {
    "portable": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512vnni": [
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx512vnni",
    ],
}
#: the whole module keeps a * b + c as two roundings, as torch's elementwise ops do: the layer
#: step's glue (RMSNorm, RoPE) must round as plait/models/llama.py does, and the kernels it
#: calls are the ones the eager path calls (their SIMD loops use explicit FMA intrinsics)
_COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
CSRC = Path(__file__).with_name("csrc")


def has_avx2() -> bool:
    return platform.machine().lower() in (
        "x86_64",
        "amd64",
    ) and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def has_avx512_vnni() -> bool:
    """AVX-512 with VNNI (torch's own CPU probe; its AVX512 level implies F/BW/VL/DQ)."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return (
        has_avx2()
        and torch.backends.cpu.get_cpu_capability() == "AVX512"
        and is_vnni is not None
        and bool(is_vnni())
    )


def best_level() -> str:
    """The most demanding level this CPU runs."""
    return "avx512vnni" if has_avx512_vnni() else "avx2" if has_avx2() else "portable"


def sources() -> list[Path]:
    """The module's translation units: every kernel's, then the bindings."""
    return [*sorted((CSRC / "src").glob("*.cpp")), CSRC / "bindings.cpp"]


def _tree_digest(flags: list[str], ldflags: list[str]) -> str:
    """A digest of the flags and of every file under csrc/ (path relative to it, and content).
    The include flag counts without its absolute path: two checkouts of the same tree (git
    worktrees, CI clones) share one module instead of each compiling its own."""
    include = f"-I{CSRC / 'include'}"
    portable = ["-I<csrc>/include" if f == include else f for f in flags]
    digest = hashlib.sha256(json.dumps([portable, ldflags]).encode())
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(CSRC)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _flags(level: str) -> tuple[list[str], list[str]]:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return [*_COMMON_FLAGS, *_FLAGS[level], f"-I{CSRC / 'include'}"], ["-fopenmp"]


def module_name(level: str) -> str:
    """The module's name at ``level``: the level and a digest of the csrc tree and the flags."""
    return f"plait_cpu_{level}_{_tree_digest(*_flags(level))}"


@functools.lru_cache(maxsize=None)
def extension(level: str | None = None) -> ModuleType:
    """The CPU backend's native module for ``level`` (``None``: :func:`best_level`), one
    submodule per kernel (``panel_gemm``, ``qmatmul``, ``decode_attention``, ``greedy_head``,
    ``layer_step``, ``thread_control``)."""
    level = best_level() if level is None else level
    flags, ldflags = _flags(level)
    return build_cache.load(module_name(level), sources(), cflags=flags, ldflags=ldflags)


def build() -> bool:
    """Build (or load from the cache) the module at :func:`best_level` (``python -m
    plait.backends.cpu.cpp_build``, the Makefile's ``kernels`` target, builds it ahead); False
    where it failed (the backend then falls back to torch paths at run time, with a warning)."""
    try:
        extension()
    except Exception as e:  # a missing compiler surfaces as several error types
        print(f"warning: the CPU kernels did not build ({e}); the CPU backend will use torch paths")
        return False
    return True


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    built = build()
    print(
        f"CPU kernels at level {best_level()}: {'built or cached' if built else 'failed'} in "
        f"{time.perf_counter() - start:.0f} s"
    )
