"""``quantization_activations`` is validated, and refused where it cannot run (never ignored)."""

from __future__ import annotations

import pytest

from plait.core.backend_api import Backend
from plait.core.engine_config import EngineConfig


def test_unknown_value_is_a_value_error_naming_the_option():
    with pytest.raises(ValueError, match="quantization_activations"):
        EngineConfig(quantization="int8", quantization_activations="int4").validate()


def test_int8_activations_need_a_quantized_model(tmp_path):
    cfg = EngineConfig(quantization_activations="int8")
    with pytest.raises(ValueError, match="needs a quantized model"):
        cfg.quant_config(tmp_path)


class PortableBackend(Backend):
    """The base class's defaults, named (no device needed: nothing is allocated)."""

    name = "portable-test"


def test_backends_without_the_kernel_refuse_int8_activations():
    from plait.backends.cuda.plugin import CudaBackend

    for cls in (PortableBackend, CudaBackend):
        with pytest.raises(ValueError, match="quantization_activations='int8'"):
            cls.quantized_linear(cls.__new__(cls), "int4", "int8")


def test_cpu_backend_refuses_int8_activations_without_vnni(monkeypatch):
    from plait.backends.cpu import cpp_build
    from plait.backends.cpu.plugin import CpuBackend

    monkeypatch.setattr(cpp_build, "has_avx512_vnni", lambda: False)
    with pytest.raises(ValueError, match="VNNI"):
        CpuBackend.quantized_linear(CpuBackend.__new__(CpuBackend), "gguf", "int8")


def test_server_flag_reaches_the_engine():
    from plait.server.server_args import ServerArgs

    args = ServerArgs(quantization="gguf", quantization_activations="int8")
    assert args.engine_kwargs("default")["quantization_activations"] == "int8"
    assert "quantization_activations" not in ServerArgs().engine_kwargs("default")


def test_tpu_backend_refuses_quantization():
    """Its JAX model runner has no quantized layers: refused, never silently run in float."""
    from types import SimpleNamespace

    from plait.backends.tpu.plugin import TpuBackend
    from plait.quant import QuantConfig

    spec = SimpleNamespace(quantization=QuantConfig("int8"))
    with pytest.raises(ValueError, match="quantization='int8'"):
        TpuBackend.create_model_runner(TpuBackend.__new__(TpuBackend), spec, None, None)
