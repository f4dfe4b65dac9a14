"""Registers the CUDA backend (entry point ``plait.backends: cuda``).

Detection only asks torch (already imported by the core) and looks for triton without
importing it; the kernels are imported when an attention backend is created.
"""
from __future__ import annotations

import importlib.util

import torch

from plait.backends.cuda.triton_plugin import TritonBackendPlugin
from plait.core.backend_api import BackendInfo

NAME = "cuda"
PRIORITY = 100


def detect() -> BackendInfo:
    if torch.version.hip is not None:
        return BackendInfo(NAME, PRIORITY, False, "this torch is a ROCm build (use device='rocm')")
    if not torch.cuda.is_available():
        return BackendInfo(NAME, PRIORITY, False, "torch.cuda.is_available() is False")
    if importlib.util.find_spec("triton") is None:
        return BackendInfo(NAME, PRIORITY, False, "triton not installed (pip install plait[cuda])")
    return BackendInfo(NAME, PRIORITY, True)


def launch_params():
    from plait.backends.cuda.launch import CUDA_DEFAULT
    return CUDA_DEFAULT


# The entry point names this object: pluggy registers its hook methods.
plugin = TritonBackendPlugin(NAME, detect, launch_params)
