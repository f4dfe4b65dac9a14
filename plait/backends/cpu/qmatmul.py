"""The CPU backend's quantized matmul: ``qmatmul.cpp``, compiled once per CPU feature level by
:mod:`plait.backends.cpu.cpp_build` (AVX2 dequantize-and-FMA where the CPU has it, the portable
C++ loop elsewhere)."""
from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch

from plait.backends.cpu import cpp_build
from plait.quant.formats import QuantizedWeight


def extension(simd: bool | None = None) -> ModuleType:
    """The compiled kernel module (``simd=None``: the best this CPU runs)."""
    return cpp_build.extension("qmatmul.cpp", simd)


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
