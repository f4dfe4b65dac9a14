"""A drained PD server loses no request (issue 42): under ``--pd 2P2D`` (smg, the default
gateway) and steady mixed load, one prefill server then one decode server is sent SIGTERM,
as an orchestrator scaling down or rolling an update does.

What must hold: the drained server leaves the gateway before it refuses anything (no new
request is routed to it, so none is refused by it), finishes what it has (a prefill server its
pending KV sends, a decode server its running decodes), and exits 0 within ``EXIT_BOUND``;
every request of the load is answered in full (a clear error would be allowed by the outcome
classes, lost never, and this test also asks for no errors: a drain is planned, nothing died);
the remaining two servers keep serving, every KV slot of theirs is free afterwards, and no IPC
directory is left once the launch has stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
import requests

from plait.server.gateway import listed_healthy
from tests.server.conftest import start_server
from tests.server.drain import launcher_exit_code, sigterm_when_busy
from tests.server.test_chaos import wait_for_workers
from tests.server.test_chaos_topologies import Load, descendants, no_ipc_left, port_of

pytestmark = pytest.mark.slow

EXIT_BOUND = 90.0  # SIGTERM to exit: leaving (<= 30 s) + --shutdown-timeout (30 s) + teardown
STEADY = 4.0  # seconds of load before, between and after the drains


def running_on(url: str) -> int:
    return requests.get(url + "/get_server_info", timeout=30).json()["num_running_reqs"]


def drain(victim: psutil.Process, launch_log: Path) -> tuple[int, float, int]:
    """SIGTERM ``victim``; its exit code (as the launcher, its parent, logged it), the seconds
    it took, and how many requests it was running when signalled."""
    port = port_of(victim)
    url = f"http://127.0.0.1:{port}"
    took, busy = sigterm_when_busy(victim, lambda: running_on(url), EXIT_BOUND, tries=40)
    return launcher_exit_code(launch_log, port), took, busy


def test_sigterm_a_prefill_then_a_decode_server_loses_no_request(make_tiny_model, tmp_path):
    model_dir = make_tiny_model("llama")
    model = model_dir.name
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    args = ["--device", "cpu", "--pd", "2P2D", "--max-total-tokens", "2048"]
    server = start_server(args, tmp_path / "pd.log", str(model_dir), env=env, timeout=600)
    drained: dict[str, tuple[int, float, int]] = {}
    try:
        wait_for_workers(server, 4)
        with Load(server.url, model) as load:
            for mode in ("prefill", "decode"):
                time.sleep(STEADY)
                victim = descendants(server.proc.pid, mode)[0]
                gone = f"http://127.0.0.1:{port_of(victim)}"
                drained[mode] = drain(victim, server.log)
                assert gone not in listed_healthy(server.url), f"the gateway still lists {gone}"
            time.sleep(STEADY)
        assert server.proc.poll() is None, "the launch stopped"
        remaining = descendants(server.proc.pid, "prefill") + descendants(server.proc.pid, "decode")
        assert len(remaining) == 2
        held = {port_of(p): kv_held(f"http://127.0.0.1:{port_of(p)}") for p in remaining}
    finally:
        server.stop()
    print(f"pd drain (exit code, seconds to exit, running when signalled): {drained}")
    outcomes = load.report("pd drain")
    for mode, (code, _, _) in drained.items():
        assert code == 0, f"the drained {mode} server exited {code}"
    assert outcomes["error"] == 0 and outcomes["connection error"] == 0, outcomes
    assert not any(held.values()), f"KV tokens still held after the load: {held}"
    no_ipc_left(tmp)


def kv_held(url: str, wait: float = 5.0) -> int:
    """KV tokens a server still holds once the load has ended (0 within ``wait`` seconds: a
    request's last step may still be releasing); a request half-refused by a draining peer held
    its slots until the transfer timeout (30 s) instead."""
    deadline = time.monotonic() + wait
    while True:
        info = requests.get(url + "/get_server_info", timeout=30).json()
        held = info["max_total_tokens"] - info["available_kv_tokens"] - info["evictable_kv_tokens"]
        if held == 0 or time.monotonic() > deadline:
            return held
        time.sleep(0.5)
