"""The CPU backend's quantized matmul: ``qmatmul.cpp``, compiled once per CPU feature level by
:mod:`plait.backends.cpu.cpp_build`.

By default the weights are dequantized in registers and multiplied with float32 activations
(AVX2 where the CPU has it, the portable C++ loop otherwise), which matches
dequantize-then-matmul up to float rounding. ``int8_activations=True``
(``--quantization-activations int8``) runs ``qmatmul_q8`` where the CPU has AVX-512 VNNI:
activations quantized to int8 per 32-block and int8 dot products, as llama.cpp does (its error
is bounded by the activations' rounding, see ``qmatmul.cpp``).
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


def cpu_quantized_matmul(level: str | None = None, int8_activations: bool = False
                         ) -> Callable[[torch.Tensor, QuantizedWeight], torch.Tensor]:
    """``f(x[..., K], weight) -> [..., N]`` in float32 (other activation dtypes are converted
    in and out): ``qmatmul_q8`` with ``int8_activations`` (ValueError where the build has no
    VNNI kernel), else ``qmatmul``."""
    ext = extension(level)
    if int8_activations and not hasattr(ext, "qmatmul_q8"):
        raise ValueError(f"int8 activations need the avx512vnni build, not {ext.simd_level()!r}")
    kernel = ext.qmatmul_q8 if int8_activations else ext.qmatmul

    def matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = kernel(x2.float(), w.qs, w.scales, w.mins, w.bits, w.group_size)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])

    return matmul
