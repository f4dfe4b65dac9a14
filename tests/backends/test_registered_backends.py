"""The conformance kit against every built-in device through the registry. Each class skips,
with the registry's reason, where its hardware is missing (everywhere in CI); on a machine with
the device it certifies the real kernels, graphs and engine. PLAIT_KIT_GRID=full for the full
shape grid."""

import torch

from plait.testing import BackendConformance

#: the GPUs also check bf16 attention: their Triton kernels take bf16 dot inputs (tensor
#: cores), which the interpreter cannot emulate
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TestCudaDevice(BackendConformance):
    device = "cuda"
    dtypes = GPU_DTYPES


class TestRocmDevice(BackendConformance):
    device = "rocm"
    dtypes = GPU_DTYPES


class TestTpuDevice(BackendConformance):
    device = "tpu"


class TestNpuDevice(BackendConformance):
    device = "npu"
