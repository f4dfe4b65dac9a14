"""Triton's interpreter must be chosen before any ``@triton.jit`` kernel is defined (triton reads
TRITON_INTERPRET when the decorator runs), so it is set here, before test modules import the
kernels. On a machine with a CUDA GPU the kernels compile natively instead."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
