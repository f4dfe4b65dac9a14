"""Compile the CPU backend's C++ kernels once (cached on disk by :mod:`.build_cache`, so later
processes only load the .so).

Dispatch per CPU feature level (:data:`LEVELS`, from least to most demanding):

- ``portable``: no SIMD flags (the sources' plain loops);
- ``avx2``: ``-mavx2 -mfma -mf16c``, where torch reports AVX2 or AVX512 on x86-64;
- ``avx512vnni``: ``avx2`` plus AVX-512 F/BW/VL/DQ and VNNI, where the CPU also has VNNI
  (e.g. AMD Zen 4, Intel Cascade Lake and later). Sources with nothing for it compile their
  AVX2 path under it.

Each level's build has its own name, so their caches never collide. The name also carries a
digest of the source, the headers beside it (``*.h``) and the flags: the cache finds a module
by name alone, so an edited header or flag must change the name.

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
    "avx512vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                   "-mavx512dq", "-mavx512vnni"],
}
#: flags one source needs beyond its level's: the native decode step keeps a * b + c as two
#: roundings, as torch's elementwise ops do (its SIMD kernels use explicit FMA intrinsics)
_SOURCE_FLAGS = {"decode_step.cpp": ["-ffp-contract=off"]}


def has_avx2() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def has_avx512_vnni() -> bool:
    """AVX-512 with VNNI (torch's own CPU probe; its AVX512 level implies F/BW/VL/DQ)."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return (has_avx2() and torch.backends.cpu.get_cpu_capability() == "AVX512"
            and is_vnni is not None and bool(is_vnni()))


def best_level() -> str:
    """The most demanding level this CPU runs."""
    return "avx512vnni" if has_avx512_vnni() else "avx2" if has_avx2() else "portable"


@functools.lru_cache(maxsize=None)
def extension(source: str, level: str | None = None) -> ModuleType:
    """The module compiled from ``source`` (a file beside this one) for ``level``
    (``None``: :func:`best_level`)."""
    level = best_level() if level is None else level
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    path = Path(__file__).with_name(source)
    flags = ["-O3", "-fopenmp"] + _FLAGS[level] + _SOURCE_FLAGS.get(source, [])
    ldflags = ["-fopenmp"]
    digest = hashlib.sha256(json.dumps([flags, ldflags]).encode())
    for part in [path, *sorted(path.parent.glob("*.h"))]:
        digest.update(part.read_bytes())
    name = f"plait_{path.stem}_{level}_{digest.hexdigest()[:12]}"
    return build_cache.load(name, [path], cflags=flags, ldflags=ldflags)


#: every source the CPU backend builds at this CPU's level (``python -m
#: plait.backends.cpu.cpp_build``, the Makefile's ``kernels`` target, builds them ahead)
SOURCES = ("decode_attention.cpp", "decode_step.cpp", "greedy_head.cpp", "panel_gemm.cpp",
           "qmatmul.cpp", "thread_control.cpp")


def build_all() -> list[str]:
    """Build (or load from the cache) every source in :data:`SOURCES` at
    :func:`best_level`; returns the ones that failed (the backend then falls back to torch
    paths at run time, with a warning)."""
    failed = []
    for source in SOURCES:
        try:
            extension(source)
        except Exception as e:  # a missing compiler surfaces as several error types
            print(f"warning: {source} did not build ({e}); the CPU backend will use torch paths")
            failed.append(source)
    return failed


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    failed = build_all()
    print(f"CPU kernels at level {best_level()}: {len(SOURCES) - len(failed)} of {len(SOURCES)} "
          f"built or cached in {time.perf_counter() - start:.0f} s")
