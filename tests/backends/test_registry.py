"""Every built-in backend arrives through the entry points with its name and priority, detection
is cheap and honest on a CPU-only machine, and ``--device`` resolution explains failures."""

import subprocess
import sys
import types

import pytest
import torch

from plait.backends import registry
from plait.backends.cuda import plugin as cuda_plugin
from plait.backends.cuda.plugin import CudaBackend
from plait.backends.rocm import plugin as rocm_plugin
from plait.backends.rocm.plugin import RocmBackend
from plait.backends.tpu import plugin as tpu_plugin
from plait.backends.tpu.plugin import TpuBackend

BUILT_IN = {"cpu": 0, "cuda": 100, "rocm": 90, "tpu": 80, "npu": 70}


def test_built_in_backends_register_through_entry_points_with_their_priorities():
    infos = registry.available_backends()
    for name, priority in BUILT_IN.items():
        assert name in infos, f"{name} missing: is the package installed (pip install -e .)?"
        assert infos[name].priority == priority
    names = {p for p, _ in registry.plugin_manager().list_name_plugin()}
    assert {"cuda", "rocm", "tpu", "npu"} <= names  # entry-point names, like a third party's


def test_detection_does_not_import_device_libraries():
    # cuda/rocm never import triton to detect; tpu imports jax only where libtpu exists. A fresh
    # interpreter, since this test process has imported them for the kernel tests.
    code = (
        "import sys; from plait.backends import registry; registry.available_backends(); "
        "print(sorted(m for m in ('triton', 'jax', 'torch_npu') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without accelerators")
def test_auto_falls_back_to_cpu_without_accelerators():
    assert registry.resolve_device("auto") == "cpu"


@pytest.mark.parametrize("device", ["cuda", "rocm", "tpu", "npu"])
def test_unavailable_device_error_lists_every_backend_and_why(device):
    if registry.available_backends()[device].available:
        pytest.skip(f"{device} is available on this machine")
    with pytest.raises(ValueError) as e:
        registry.resolve_device(device)
    msg = str(e.value)
    assert f"device={device!r} is unavailable" in msg
    for name in BUILT_IN:
        assert f"  {name}" in msg
    assert registry.available_backends()[device].reason in msg


def test_unknown_device_error_lists_the_registered_ones():
    with pytest.raises(ValueError, match="'warp-drive' is not a registered backend") as e:
        registry.resolve_device("warp-drive")
    assert "cpu      available" in str(e.value)


def test_cuda_detection(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert CudaBackend.info().reason == "torch.cuda.is_available() is False"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_plugin.importlib.util, "find_spec", lambda name: None)
    assert "triton not installed" in CudaBackend.info().reason
    monkeypatch.setattr(cuda_plugin.importlib.util, "find_spec", lambda name: object())
    assert CudaBackend.info().available
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm build" in CudaBackend.info().reason  # a HIP torch is rocm's, not cuda's


def test_rocm_detection(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert "torch.version.hip is None" in RocmBackend.info().reason
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rocm_plugin.importlib.util, "find_spec", lambda name: object())
    assert RocmBackend.info().available


def test_tpu_detection(monkeypatch):
    real = tpu_plugin.importlib.util.find_spec
    monkeypatch.setattr(
        tpu_plugin.importlib.util,
        "find_spec",
        lambda name: None if name == "libtpu" else real(name),
    )
    assert "libtpu not installed" in TpuBackend.info().reason
    monkeypatch.setattr(
        tpu_plugin.importlib.util, "find_spec", lambda name: None if name == "jax" else real(name)
    )
    assert "jax not installed" in TpuBackend.info().reason
    # libtpu present but jax finds no TPU (e.g. a CPU host with jax[tpu] installed)
    monkeypatch.setattr(tpu_plugin.importlib.util, "find_spec", lambda name: object())
    fake_jax = types.SimpleNamespace(
        devices=lambda kind: (_ for _ in ()).throw(RuntimeError("Unknown backend tpu"))
    )
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    info = TpuBackend.info()
    assert not info.available and "jax sees no TPU" in info.reason
