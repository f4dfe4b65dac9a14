"""The conformance kit against every built-in device through the registry. Each class skips,
with the registry's reason, where its hardware is missing (everywhere in CI); on a machine with
the device it certifies the real kernels, graphs and engine. PLAIT_KIT_GRID=full for the full
shape grid."""
from plait.testing import BackendConformance


class TestCudaDevice(BackendConformance):
    device = "cuda"


class TestRocmDevice(BackendConformance):
    device = "rocm"


class TestTpuDevice(BackendConformance):
    device = "tpu"


class TestNpuDevice(BackendConformance):
    device = "npu"
