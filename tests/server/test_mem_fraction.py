"""``--mem-fraction``: the KV pool is that share of the memory free at start (per token: K and
V of every layer), and a share outside (0, 1] is refused before anything starts, naming the
option. The tiny random Llama has 2 layers, 2 KV heads of 16 dims in float32: 512 bytes a
token."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from plait.server import scheduler_process
from plait.server.cli import _engine, build_parser
from plait.server.scheduler_process import build_engine, kv_budget_from_fraction
from plait.server.server_args import from_namespace
from tests.server.conftest import start_server

BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4
GIB = 2**30


@pytest.fixture(scope="module")
def tiny(make_tiny_model) -> str:
    return str(make_tiny_model("llama"))


def serve_args(*flags: str):
    return from_namespace(build_parser().parse_args(["serve", *flags]))


def pool_tokens(model: str, fraction: float) -> int:
    engine = build_engine(
        {"engine_kwargs": {"model_path": model, "device": "cpu", "mem_fraction": fraction}}
    )
    try:
        return engine.get_server_info()["max_total_tokens"]
    finally:
        engine.shutdown()


def available_gib() -> float:
    return psutil.virtual_memory().available / GIB


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "nan", "inf"])
def test_a_fraction_outside_0_1_is_refused_naming_the_option(bad):
    message = r"^mem_fraction \(--mem-fraction\) must be in \(0, 1\]"
    with pytest.raises(ValueError, match=message):
        serve_args("--mem-fraction", bad).engine_kwargs("/m")
    with pytest.raises(ValueError, match=message):  # the scheduler process checks it too
        kv_budget_from_fraction({"device": "cpu", "mem_fraction": float(bad)})


def test_a_bad_fraction_stops_plait_serve_before_it_starts(tiny_model_dir):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.server.cli",
            "serve",
            "--model-path",
            str(tiny_model_dir),
            "--mem-fraction",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--mem-fraction) must be in (0, 1]" in done.stderr


def test_the_pool_follows_the_fraction(tiny, monkeypatch):
    """With 0.25 GiB free, 0.1 and 0.2 of it hold 0.025 and 0.05 GiB of KV: twice the tokens,
    and never more than the fraction's bytes."""
    monkeypatch.setattr(scheduler_process, "_free_device_gb", lambda device: 0.25)
    sizes = {f: pool_tokens(tiny, f) for f in (0.1, 0.2)}
    for f, tokens in sizes.items():
        budget = f * 0.25 * GIB
        assert budget - 64 * BYTES_PER_TOKEN < tokens * BYTES_PER_TOKEN <= budget
    assert abs(sizes[0.2] - 2 * sizes[0.1]) <= 64


def test_cpu_tensor_parallel_ranks_share_the_fraction(monkeypatch):
    """The ranks of ``--tp`` on the CPU allocate from one memory: each gets its share, so the
    pools together stay within the fraction."""
    monkeypatch.setattr(scheduler_process, "_free_device_gb", lambda device: 8.0)
    one = kv_budget_from_fraction({"device": "cpu", "mem_fraction": 0.5})
    two = kv_budget_from_fraction({"device": "cpu", "mem_fraction": 0.5, "tp_size": 2})
    assert one == {"device": "cpu", "kv_cache_memory_gb": 4.0}
    assert two["kv_cache_memory_gb"] == 2.0 and "mem_fraction" not in two


def test_free_cpu_memory_is_the_available_memory():
    """Free means available to allocate: free pages plus reclaimable page cache (reading a
    model's files fills the cache, which a pool may take back)."""
    before = available_gib()
    measured = scheduler_process._free_device_gb("cpu")
    after = available_gib()
    assert 0.9 * min(before, after) <= measured <= 1.1 * max(before, after)


def test_the_real_measure_sizes_the_pool(tiny):
    before = available_gib()
    tokens = pool_tokens(tiny, 0.01)
    after = available_gib()
    kv_gib = tokens * BYTES_PER_TOKEN / GIB
    assert 0.01 * 0.8 * min(before, after) <= kv_gib <= 0.01 * 1.2 * max(before, after)


def test_generate_one_off_takes_the_fraction(tiny, monkeypatch):
    """``plait generate``/``chat`` build the engine in their own process: the fraction is
    turned into a budget there too, not passed to ``plait.Engine`` as an unknown option."""
    monkeypatch.setattr(scheduler_process, "_free_device_gb", lambda device: 0.25)
    ns = build_parser().parse_args(
        ["generate", "hi", "--model-path", tiny, "--device", "cpu", "--mem-fraction", "0.1"]
    )
    engine = _engine(from_namespace(ns))
    try:
        assert engine.get_server_info()["max_total_tokens"] == pool_tokens(tiny, 0.1)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_plait_serve_reports_the_pool_the_fraction_gives(tiny, tmp_path):
    before = available_gib()
    server = start_server(
        ["--device", "cpu", "--mem-fraction", "0.02"], tmp_path / "serve.log", tiny, timeout=300
    )
    try:
        after = available_gib()
        info = server.get("/get_server_info").json()
    finally:
        assert server.stop() == 0
    kv_gib = info["max_total_tokens"] * BYTES_PER_TOKEN / GIB
    assert 0.02 * 0.8 * min(before, after) <= kv_gib <= 0.02 * 1.2 * max(before, after)
