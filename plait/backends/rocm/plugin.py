"""Registers the ROCm backend (entry point ``plait.backends: rocm``).

ROCm builds of torch expose HIP devices through the ``torch.cuda`` API (device ``"cuda"``) and
``torch.version.hip`` names the HIP version; that is the whole detection.
"""
from __future__ import annotations

import importlib.util

import torch

from plait.backends.cuda.triton_plugin import TritonBackendPlugin
from plait.core.backend_api import BackendInfo

NAME = "rocm"
PRIORITY = 90


def detect() -> BackendInfo:
    if torch.version.hip is None:
        return BackendInfo(NAME, PRIORITY, False, "torch is not a ROCm build (torch.version.hip "
                                                  "is None)")
    if not torch.cuda.is_available():
        return BackendInfo(NAME, PRIORITY, False, "no HIP device visible to torch")
    if importlib.util.find_spec("triton") is None:
        return BackendInfo(NAME, PRIORITY, False, "triton not installed (pip install plait[rocm])")
    return BackendInfo(NAME, PRIORITY, True)


def launch_params():
    from plait.backends.rocm.launch import ROCM_DEFAULT
    return ROCM_DEFAULT


# The entry point names this object: pluggy registers its hook methods.
plugin = TritonBackendPlugin(NAME, detect, launch_params)
