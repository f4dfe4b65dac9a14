"""What the Triton kernels' ``tl.dot`` calls take as inputs, per activation dtype: one rule for
the attention kernels and the quantized matmul.

- fp16 and bf16 stay in their own type, so the dots run on the tensor cores (products
  accumulate in fp32 either way). bf16 once computed in fp32 here: an fp32 "ieee" dot runs on
  the CUDA cores, and a 64 x 256-token bf16 prefill on an H200 spent 5.9 ms per layer in the
  extend kernel (0.8 TFLOP/s), 56 % of the batch's GPU time.
- fp32 takes exact ("ieee") dots: tf32 would miss the reference's tolerance and float32 greedy
  parity with transformers.
- Triton's interpreter (``TRITON_INTERPRET=1``) gets bf16 dots wrong (its numpy emulation;
  conversions are right), so there bf16 is widened to fp32.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

# Read when the kernels are defined, as triton itself reads it.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def compute_dtype(dtype: torch.dtype):
    """The dots' input type for activations of ``dtype``."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not INTERPRETED:
        return tl.bfloat16
    return tl.float32


def dot_precision(dtype: torch.dtype) -> str | None:
    """``input_precision`` for the dots: exact for fp32 inputs, the tensor cores' default for
    16-bit ones."""
    return None if compute_dtype(dtype) != tl.float32 else "ieee"
