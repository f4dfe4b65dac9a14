"""The CPU backend's quantized matmul: ``qmatmul.cpp``, compiled once per CPU feature level by
:mod:`plait.backends.cpu.cpp_build`.

Where the CPU has AVX-512 VNNI the default is ``qmatmul_q8``: activations quantized to int8 per
32-block and int8 dot products, as llama.cpp does (its error is bounded by the activations'
rounding, see ``qmatmul.cpp``). Elsewhere, or with ``int8_activations=False``, the weights are
dequantized in registers and multiplied with float32 activations (AVX2 where the CPU has it,
the portable C++ loop otherwise), which matches dequantize-then-matmul up to float rounding.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch

from plait.backends.cpu import cpp_build
from plait.quant.formats import QuantizedWeight


def extension(level: str | None = None) -> ModuleType:
    """The compiled kernel module (``level=None``: the best this CPU runs)."""
    return cpp_build.extension("qmatmul.cpp", level)


def cpu_quantized_matmul(level: str | None = None, int8_activations: bool = True
                         ) -> Callable[[torch.Tensor, QuantizedWeight], torch.Tensor]:
    """``f(x[..., K], weight) -> [..., N]`` in float32 (other activation dtypes are converted
    in and out): ``qmatmul_q8`` where the build has it and ``int8_activations``, else
    ``qmatmul``."""
    ext = extension(level)
    kernel = ext.qmatmul_q8 if int8_activations and hasattr(ext, "qmatmul_q8") else ext.qmatmul

    def matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = kernel(x2.float(), w.qs, w.scales, w.mins, w.bits, w.group_size)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])

    return matmul
