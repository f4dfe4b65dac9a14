"""The lease kit (``benchmarks/lease_kit.py``) end to end on the CPU in its tiny dry mode, so a
lease never finds it broken; and its busy-fraction / bandwidth arithmetic on a kernel list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.lease_kit import busy_and_bandwidth, hbm_limit
from benchmarks.lease_shapes import kv_bytes_per_step, shape_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_kit_runs_every_stage_on_the_cpu(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.lease_kit", "--out", str(tmp_path), "--tiny"]
    cmd += ["--device", "cpu", "--serving-client", "httpx", "--shapes", "smollm2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "kit.json").read_text())["stages"]
    assert all(report[s]["ok"] for s in ("host", "decode", "profile", "serving")), report
    assert set(report["host"]) >= {"1", "4"} and report["host"]["4"]["passes"] > 0
    rates = report["decode"]["smollm2"]["decode_tok_per_s"]
    assert rates["1"] > 0 and rates["4"] > 0
    assert report["profile"]["smollm2"]["busy_fraction"] is None  # a CPU has no device kernels
    assert report["serving"]["completed"] == 4 and report["serving"]["failed"] == 0
    assert "| serving | completed | 4 |" in (tmp_path / "kit.md").read_text()


def test_busy_fraction_and_attention_bandwidth_from_a_kernel_list() -> None:
    config = shape_config("llama3-8b", tiny=False)
    # 32 layers x 8 KV heads x 128 x (K and V) x 2 bytes = 128 KiB per token
    assert kv_bytes_per_step(config, 1, 1, "bfloat16") == 131072
    kernels = [("_fwd_kernel_stage1", 0.002), ("_fwd_kernel_stage2", 0.0005), ("gemm", 0.0065)]
    got = busy_and_bandwidth(kernels, 0.01, config, 64, 256, 3, "bfloat16")
    assert abs(got["busy_fraction"] - 0.9) < 1e-9
    read = 131072 * 64 * (257 + 258)
    assert abs(got["attention_tbps"] - read / 0.0025 / 1e12) < 1e-9
    assert hbm_limit("NVIDIA H200") == 4.8 and hbm_limit("NVIDIA H100 80GB HBM3") == 3.35
