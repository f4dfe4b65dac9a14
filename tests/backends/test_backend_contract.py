"""The Backend contract as the core sees it: one object per --device, chosen once; unset engine
options come from the backend's defaults; registration refuses ambiguity; an unavailable
backend's own reason reaches the user."""

import contextlib

import pytest
import torch

from plait.backends import registry
from plait.backends.cpu.plugin import CpuBackend
from plait.backends.cuda.plugin import CudaBackend
from plait.backends.npu.attention import fia_supported
from plait.backends.npu.plugin import NpuBackend
from plait.backends.rocm.plugin import RocmBackend
from plait.backends.tpu.plugin import TpuBackend
from plait.core.backend_api import Backend
from plait.core.engine_config import EngineConfig
from plait.testing import make_tiny_llama, temporarily_registered
from plait.testing.register import _OneBackendPlugin


class NeedsAFluxCapacitor(Backend):
    name = "flux"
    priority = 1000  # outranks everything, yet auto must not pick it: it is unavailable

    @classmethod
    def unavailable_reason(cls):
        return "no flux capacitor at 1.21 GW"


class PagedHalfCpu(CpuBackend):
    name = "paged-half-cpu"
    priority = -50
    default_dtype = "bfloat16"
    default_page_size = 16


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_get_backend_hands_out_one_object_of_the_registered_class():
    backend = registry.get_backend("cpu")
    assert type(backend) is CpuBackend and backend.torch_device == torch.device("cpu")
    if not torch.cuda.is_available():
        assert type(registry.get_backend("auto")) is CpuBackend


def test_an_unavailable_backends_reason_reaches_the_engine_error(tiny_model):
    import plait

    with temporarily_registered(NeedsAFluxCapacitor):
        assert registry.resolve_device("auto") != "flux"
        with pytest.raises(ValueError) as e:
            plait.Engine(model_path=tiny_model, device="flux")
    msg = str(e.value)
    assert "device='flux' is unavailable: no flux capacitor at 1.21 GW" in msg
    assert "cpu      available" in msg  # and the listing of every backend
    assert "flux" not in registry.available_backends()  # unregistered after the block


def test_two_classes_claiming_one_name_are_refused():
    class AnotherCpu(CpuBackend):
        pass  # inherits name = "cpu"

    with temporarily_registered(AnotherCpu):
        with pytest.raises(ValueError, match="'cpu' is registered twice") as e:
            registry.backend_classes()
    assert "plugin.CpuBackend" in str(e.value) and "AnotherCpu" in str(e.value)
    assert registry.backend_classes()["cpu"] is CpuBackend


@contextlib.contextmanager
def _plugin_registering(obj):
    """A plugin whose hook calls ``register(obj)``, whatever ``obj`` is."""
    plugin = _OneBackendPlugin(obj)
    registry.register(plugin, name="plait-testing-bad")
    try:
        yield
    finally:
        registry.unregister(plugin)


def test_register_takes_only_named_backend_classes():
    class Nameless(Backend):
        pass

    for bad, match in ((CpuBackend(), "Backend subclass"), (Nameless, "non-empty `name`")):
        with _plugin_registering(bad):
            with pytest.raises(ValueError, match=match):
                registry.backend_classes()


def test_unset_engine_options_take_the_backends_defaults_and_explicit_values_win():
    filled = EngineConfig().with_backend_defaults(NpuBackend)
    assert (filled.dtype, filled.page_size) == ("bfloat16", 128)
    explicit = EngineConfig(dtype="float32", page_size=1).with_backend_defaults(NpuBackend)
    assert (explicit.dtype, explicit.page_size) == ("float32", 1)

    class BadDefault(CpuBackend):
        default_dtype = "float8"

    with pytest.raises(ValueError, match="dtype must be"):
        EngineConfig().with_backend_defaults(BadDefault)


def test_npu_defaults_select_the_fused_kernel():
    # Not the silent fallback to the torch reference that float32 / page size 1 would take.
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[NpuBackend.default_dtype]
    assert fia_supported(dtype, NpuBackend.default_page_size)


def test_distributed_backends_per_device():
    assert {
        cls.name: cls.distributed_backend
        for cls in (CpuBackend, CudaBackend, RocmBackend, TpuBackend, NpuBackend)
    } == {"cpu": "gloo", "cuda": "nccl", "rocm": "nccl", "tpu": "gloo", "npu": "hccl"}


def test_engine_runs_with_the_backends_defaults(tiny_model):
    import plait

    with temporarily_registered(PagedHalfCpu):
        engine = plait.Engine(model_path=tiny_model, device="paged-half-cpu", max_total_tokens=512)
        try:
            assert engine.get_server_info()["page_size"] == 16
            assert engine.config.dtype == "bfloat16"
            out = engine.generate(
                input_ids=[1, 42, 71],
                sampling_params={"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
            )
            assert len(out["output_ids"]) == 3
        finally:
            engine.shutdown()
        engine = plait.Engine(
            model_path=tiny_model,
            device="paged-half-cpu",
            max_total_tokens=512,
            dtype="float32",
            page_size=1,
        )
        try:
            assert (engine.config.dtype, engine.config.page_size) == ("float32", 1)
        finally:
            engine.shutdown()
