"""One OpenMP team per engine (plait.backends.cpu.threads): host threads run torch with one
thread, so they never own a libgomp team; the caller's thread count is restored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import plait

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler on this machine to build the helper",
)


def run_fresh(script: str, *args: str) -> str:
    """Run ``script`` in a fresh interpreter with two OpenMP threads and return its stdout: the
    checks count the process's OS threads, which other tests' engines would disturb, and a
    thread's team outlives it only in its own process."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


HOST_THREAD_SCRIPT = """
import json, os, threading, torch
from plait.backends.cpu.threads import one_thread_here
def os_threads(): return len(os.listdir("/proc/self/task"))
seen = {}
def body():  # a fresh thread: no OpenMP team yet
    seen["before"] = torch.get_num_threads()
    with one_thread_here():
        seen["inside"] = torch.get_num_threads()
        threads = os_threads()
        torch.randn(2_000_000).exp()  # large enough for torch to go parallel
        seen["new_os_threads"] = os_threads() - threads
    seen["after"] = torch.get_num_threads()
    threads = os_threads()
    torch.randn(2_000_000).exp()
    seen["team_after"] = os_threads() - threads
t = threading.Thread(target=body)
t.start()
t.join()
print(json.dumps(seen))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: torch never starts a team")
def test_a_host_thread_runs_parallel_ops_without_starting_a_team():
    seen = json.loads(run_fresh(HOST_THREAD_SCRIPT).strip().splitlines()[-1])
    assert seen["before"] == 2 and seen["inside"] == 1 and seen["new_os_threads"] == 0
    assert seen["after"] == seen["before"]
    assert seen["team_after"] > 0  # the restored count does start a team: the check can fail


def test_engine_start_leaves_the_callers_thread_count_alone(make_tiny_model):
    before = torch.get_num_threads()
    with plait.Engine(model_path=make_tiny_model("llama"), max_total_tokens=256) as engine:
        assert torch.get_num_threads() == before
        assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})


ENGINE_START_SCRIPT = """
import os, sys, torch, plait
def threads(): return len(os.listdir("/proc/self/task"))
if sys.argv[2] == "team-before":  # the caller owns a team when it starts the engine
    torch.set_num_threads(2)
    torch.randn(2_000_000).exp()
with plait.Engine(model_path=sys.argv[1], max_total_tokens=256) as engine:
    engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
    before = threads()
    torch.randn(2_000_000).exp()  # the caller's first parallel region starts its team now
    print("NEW_TEAM_THREADS", threads() - before)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: torch never starts a team")
@pytest.mark.parametrize("caller", ["fresh", "team-before"])
def test_engine_start_leaves_the_callers_thread_without_an_openmp_team(make_tiny_model, caller):
    """All of the engine's start-up torch work (KV pools, weights) runs under host_thread, which
    also frees a team the caller had (torch.set_num_threads, a parallel op), so the caller's
    thread owns no team afterwards: its next parallel op starts one (new OS threads appear)."""
    out = run_fresh(ENGINE_START_SCRIPT, str(make_tiny_model("llama")), caller)
    assert int(out.split("NEW_TEAM_THREADS")[1].split()[0]) == 1, out
