"""Registers the ROCm backend (entry point ``plait.backends: rocm``).

ROCm builds of torch expose HIP devices through the ``torch.cuda`` API (device ``"cuda"``) and
``torch.version.hip`` names the HIP version; that is the whole detection. The kernels and graph
capture are the CUDA backend's, with AMD launch parameters.
"""

from __future__ import annotations

import importlib.util
import types
from typing import Callable

import torch

from plait.backends.cuda.triton_backend import TritonBackend
from plait.backends.hookspecs import hookimpl
from plait.backends.rocm.launch import ROCM_DEFAULT
from plait.core.backend_api import Backend


class RocmBackend(TritonBackend):
    name = "rocm"
    priority = 90
    launch = ROCM_DEFAULT

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.version.hip is None:
            return "torch is not a ROCm build (torch.version.hip is None)"
        if not torch.cuda.is_available():
            return "no HIP device visible to torch"
        if importlib.util.find_spec("triton") is None:
            return "triton not installed (pip install plait[rocm])"
        return None


@hookimpl
def plait_register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(RocmBackend)


# The entry point names this object (``plait.backends.rocm.plugin:plugin``).
plugin = types.SimpleNamespace(plait_register_backends=plait_register_backends)
