"""Compile the CPU backend's C++ kernels once with ``torch.utils.cpp_extension.load`` (cached
under torch's extensions directory, so later processes only load the .so).

Dispatch per CPU feature: where torch reports AVX2 or AVX512 on x86-64 a source is built with
``-mavx2 -mfma -mf16c``; elsewhere without them (portable loops). The two builds have different
names, so their caches never collide.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from types import ModuleType

import torch


def has_avx2() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@functools.lru_cache(maxsize=None)
def extension(source: str, simd: bool | None = None) -> ModuleType:
    """The module compiled from ``source`` (a file beside this one); ``simd=None``: the best
    build this CPU runs."""
    from torch.utils.cpp_extension import load

    simd = has_avx2() if simd is None else simd
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd else [])
    name = "plait_" + Path(source).stem + ("_avx2" if simd else "_portable")
    return load(name=name, sources=[str(Path(__file__).with_name(source))], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], verbose=False)
