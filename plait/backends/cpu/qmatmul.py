"""The CPU backend's quantized matmul: ``csrc/src/qmatmul.cpp``, compiled once per CPU feature level by
:mod:`plait.backends.cpu.cpp_build`.

By default the weights are dequantized in registers and multiplied with float32 activations
(AVX-512 or AVX2 where the CPU has it, the portable C++ loop otherwise), which matches
dequantize-then-matmul up to float rounding; from 128 activation rows on (prefill, large
batches) the matrix is dequantized to float32 once per call and multiplied with oneDNN's
float32 GEMM (``at::mm`` where torch has no oneDNN). ``int8_activations=True``
(``--quantization-activations int8``) runs ``qmatmul_q8`` where the CPU has AVX-512 VNNI:
below 128 rows, activations quantized to int8 per 32-block and int8 dot products, as
llama.cpp does (its error is bounded by the activations' rounding, see
``csrc/src/qmatmul.cpp``); from 128 rows, the same float32 panels.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from plait.backends.cpu import cpp_build
from plait.quant.formats import QuantizedWeight


def extension(level: str | None = None) -> ModuleType:
    """The compiled kernels (the native module's ``qmatmul``; ``level=None``: the best this
    CPU runs)."""
    return cpp_build.extension(level).qmatmul


class CpuQuantizedMatmul:
    """``f(x[..., K], weight) -> [..., N]`` in float32 (other activation dtypes are converted
    in and out) with ``csrc/src/qmatmul.cpp`` built for ``level``: ``qmatmul_q8`` with
    ``int8_activations`` (ValueError where that build has no VNNI kernel), else ``qmatmul``. Its ``level`` and ``int8_activations`` tell the
    native step (``plait.backends.cpu.native_step``) which kernel to call itself."""

    def __init__(self, level: str | None = None, int8_activations: bool = False):
        ext = extension(level)
        if int8_activations and not hasattr(ext, "qmatmul_q8"):
            raise ValueError(
                f"int8 activations need the avx512vnni build, not {ext.simd_level()!r}"
            )
        self.level: str = ext.simd_level()
        self.int8_activations = int8_activations
        self._kernel = ext.qmatmul_q8 if int8_activations else ext.qmatmul

    def __call__(self, x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float()
        if torch.compiler.is_compiling():  # Dynamo traces the custom op, not the pybind call
            y = quantized_matmul_op(
                x2, w.qs, w.scales, w.mins, w.bits, w.group_size, self.level, self.int8_activations
            )
        else:
            y = self._kernel(x2, w.qs, w.scales, w.mins, w.bits, w.group_size)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])


@torch.library.custom_op("plait::quantized_matmul", mutates_args=())
def quantized_matmul_op(
    x: torch.Tensor,
    qs: torch.Tensor,
    scales: torch.Tensor,
    mins: Optional[torch.Tensor],
    bits: int,
    group: int,
    level: str,
    int8_activations: bool,
) -> torch.Tensor:
    """The kernel as an opaque op for ``torch.compile``'d decode (``--enable-graph-capture``):
    x float32 ``[M, K]`` -> ``[M, N]``. Eager calls skip it (a Python custom op costs a
    dispatch per call)."""
    ext = extension(level)
    kernel = ext.qmatmul_q8 if int8_activations else ext.qmatmul
    return kernel(x, qs, scales, mins, bits, group)


@quantized_matmul_op.register_fake
def _(x, qs, scales, mins, bits, group, level, int8_activations):
    return x.new_empty(x.shape[0], qs.shape[0])
