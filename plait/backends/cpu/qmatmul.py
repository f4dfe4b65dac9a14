"""The CPU backend's quantized matmul: ``qmatmul.cpp`` compiled once with
``torch.utils.cpp_extension.load`` (cached under torch's extensions directory, so later
processes only load the .so).

Dispatch per CPU feature: where torch reports AVX2 or AVX512 on x86-64 the source is built with
``-mavx2 -mfma -mf16c`` (the in-register dequantize-and-FMA path); elsewhere it is built without
them and the portable C++ loop is compiled instead. The two builds have different names, so
their caches never collide.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from plait.quant.formats import QuantizedWeight

_SOURCE = Path(__file__).with_name("qmatmul.cpp")


def has_avx2() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@functools.lru_cache(maxsize=None)
def extension(simd: bool | None = None) -> ModuleType:
    """The compiled kernel module (``simd=None``: the best this CPU runs)."""
    from torch.utils.cpp_extension import load

    simd = has_avx2() if simd is None else simd
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd else [])
    return load(name="plait_qmatmul_" + ("avx2" if simd else "portable"),
                sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                verbose=False)


def cpu_quantized_matmul(simd: bool | None = None) -> Callable[[torch.Tensor, QuantizedWeight],
                                                                torch.Tensor]:
    """``f(x[..., K], weight) -> [..., N]`` running the compiled kernel in float32 (other
    activation dtypes are converted in and out)."""
    ext = extension(simd)

    def matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = ext.qmatmul(x2.float(), w.qs, w.scales, w.mins, w.bits, w.group_size)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])

    return matmul
