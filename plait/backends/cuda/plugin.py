"""Registers the CUDA backend (entry point ``plait.backends: cuda``).

Detection only asks torch (already imported by the core) and looks for triton without
importing it; the kernels are imported when an attention backend is created.
"""

from __future__ import annotations

import importlib.util
import types
from typing import Callable

import torch

from plait.backends.cuda.triton_backend import TritonBackend
from plait.backends.hookspecs import hookimpl
from plait.core.backend_api import Backend


class CudaBackend(TritonBackend):
    name = "cuda"
    priority = 100

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.version.hip is not None:
            return "this torch is a ROCm build (use device='rocm')"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        if importlib.util.find_spec("triton") is None:
            return "triton not installed (pip install plait[cuda])"
        return None


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(CudaBackend)


# The entry point names this object (``plait.backends.cuda.plugin:plugin``).
plugin = types.SimpleNamespace(plait_register_backends=plait_register_backends)
