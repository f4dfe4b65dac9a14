"""Weight-only quantization: weights stay quantized in memory, activations stay in the model
dtype (or, with ``quantization_activations="int8"``, are rounded to int8 per 32-block inside
the kernel), and a backend-supplied kernel multiplies the two.

- :mod:`plait.quant.formats`: the in-memory format (:class:`QuantizedWeight`), quantizers for a
  float weight (int8 per-channel, int4 group-wise) and the reference dequantization.
- :mod:`plait.quant.gguf`: GGUF Q4_0 / Q4_1 / Q8_0 blocks read into that format bit for bit.
- :mod:`plait.quant.modules`: ``QuantizedLinear`` / ``QuantizedEmbedding`` and the swap of a
  model's ``nn.Linear`` layers.

The matmul itself comes from ``Backend.quantized_linear(method, activations)``: the portable
torch default; the CPU backend's C++ kernels per CPU feature level
(``plait/backends/cpu/csrc/src/qmatmul.cpp``), with an AVX-512 VNNI path for int8 activations;
the CUDA/ROCm backends' Triton dequant-GEMM (``plait/backends/cuda/quantized_matmul.py``).
Every one must pass the conformance kit's ``check_quantized_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: ``--quantization`` values. ``gguf`` runs a GGUF file's own blocks (implied by a ``.gguf``
#: model path); ``int8``/``int4`` quantize a float checkpoint's decoder Linear layers at load.
METHODS = ("none", "int8", "int4", "gguf")

#: ``--quantization-activations`` values: how a quantized matmul takes its activations.
#: ``float``: in the model dtype (matches dequantize-then-matmul up to float rounding);
#: ``int8``: quantized to int8 per block of 32 for int8 dot products (llama.cpp's scheme:
#: faster where the backend has such a kernel, logits shift by ~0.5 %); a backend may still
#: run prefill-sized products in float where that is faster (the CPU backend does from 128
#: rows). Backends that cannot run a value refuse it with ValueError.
ACTIVATIONS = ("float", "int8")


def check_method(quantization: str) -> str:
    """``quantization`` itself when it is a known method; else ValueError naming the flag."""
    if quantization not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(METHODS)}; got {quantization!r}")
    return quantization


@dataclass(frozen=True)
class QuantConfig:
    """How the loader builds the model's Linear layers (``method`` is one of :data:`METHODS`).

    ``group_size`` / ``symmetric`` apply to ``int4`` (a layer whose input size the group does
    not divide takes the largest multiple of 32 that does); ``gguf_file`` is the file whose
    blocks ``gguf`` runs."""

    method: str = "none"
    group_size: int = 32
    symmetric: bool = False
    gguf_file: Path | None = None
    activations: str = "float"
