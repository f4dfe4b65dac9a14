"""``plait.Engine`` options a backend cannot honour, or that contradict each other, are a
ValueError naming them, before anything is allocated or any tensor-parallel rank starts."""

from __future__ import annotations

import pytest

from plait.backends.cpu.plugin import CpuBackend
from plait.backends.cuda.plugin import CudaBackend
from plait.backends.npu.plugin import NpuBackend
from plait.backends.tpu.plugin import TpuBackend
from plait.core.engine_config import EngineConfig


def test_max_total_tokens_and_kv_cache_memory_gb_are_exclusive():
    with pytest.raises(ValueError, match="max_total_tokens=4096 and kv_cache_memory_gb=2"):
        EngineConfig(max_total_tokens=4096, kv_cache_memory_gb=2.0).validate()
    EngineConfig(max_total_tokens=4096).validate()
    EngineConfig(kv_cache_memory_gb=2.0).validate()
    assert EngineConfig().kv_cache_bytes() == 2**30  # neither: the 1 GiB default budget
    assert EngineConfig(kv_cache_memory_gb=0.5).kv_cache_bytes() == 2**29


@pytest.mark.parametrize(
    "backend, options, match",
    [
        (TpuBackend, dict(tp_size=2), r"tp_size=2 \(--tp 2\): device 'tpu'"),
        (NpuBackend, dict(enable_graph_capture=True), r"--enable-graph-capture\): device 'npu'"),
        (TpuBackend, dict(disable_graph_capture=True), r"--disable-graph-capture\): device 'tpu'"),
    ],
)
def test_backend_refuses_what_it_cannot_honour(backend, options, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**options).with_backend_defaults(backend)


@pytest.mark.parametrize(
    "backend, options, captured",
    [
        (TpuBackend, dict(enable_graph_capture=True), True),  # every TPU step is jit-compiled
        (TpuBackend, {}, True),
        (NpuBackend, dict(disable_graph_capture=True), False),
        (NpuBackend, {}, False),  # eager by default: its default no longer claims a capture
        (CpuBackend, dict(enable_graph_capture=True, tp_size=2), True),
        (CudaBackend, dict(tp_size=2), True),
    ],
)
def test_backend_accepts_what_it_honours(backend, options, captured):
    cfg = EngineConfig(**options).with_backend_defaults(backend)
    assert cfg.graph_capture(backend) is captured


def test_a_backend_default_outside_its_decode_modes_is_refused():
    class Contradiction(CpuBackend):
        name = "contradiction"
        decode_modes = frozenset({"eager"})
        default_graph_capture = True

    with pytest.raises(ValueError, match="default_graph_capture=True contradicts"):
        EngineConfig().with_backend_defaults(Contradiction)


def test_tpu_engine_with_tp_fails_before_any_rank_starts(monkeypatch, smollm_dir):
    """The real engine on the TPU backend (JAX's CPU device): refused with the flag's name
    before the rank processes start (they used to start, then fail on the runner's type)."""
    from plait.backends import registry
    from plait.core.tp import launcher
    import plait

    monkeypatch.setenv("PLAIT_TPU_PLATFORM", "cpu")
    registry.available_backends.cache_clear()
    monkeypatch.setattr(
        launcher.WorkerRanks,
        "__init__",
        lambda *a, **k: pytest.fail("a tensor-parallel rank was started"),
    )
    try:
        with pytest.raises(ValueError, match=r"--tp 2\): device 'tpu'"):
            plait.Engine(smollm_dir, device="tpu", tp_size=2)
    finally:
        monkeypatch.delenv("PLAIT_TPU_PLATFORM")
        registry.available_backends.cache_clear()
