"""A drained ``--dp`` worker loses no request (issue 42): ``plait serve --dp 2`` behind smg (the
default gateway), fake engines, steady load from client threads that never retry; one worker
is sent SIGTERM on its own, as an orchestrator scaling down or rolling an update does.

What must hold: the worker leaves smg's pool before it refuses anything (the launcher gives it
``--leave-gateway``), finishes what it was running, and exits 0; the gateway no longer lists
it; every request of the load is answered in full (200, the whole echo, no error, none lost);
the launcher and the other worker keep serving. Over HTTP workers (the launcher's default) and
gRPC workers (``--grpc-mode``, smg tokenizing), whose drains are separate code.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import requests

from plait.server.gateway import listed_healthy
from tests.server.conftest import FAKE, start_server
from tests.server.drain import launcher_exit_code, sigterm_when_busy
from tests.server.test_chaos_topologies import port_of
from tests.server.test_smg_gateway import listed, running_on, wait_for_workers

pytestmark = pytest.mark.slow  # a --dp 2 launch per case, ~20 s of it under load

STEADY = 3.0  # seconds of load before and after the drain
EXIT_BOUND = 60.0  # SIGTERM to exit: leaving the pool, then the drain of short requests


class Load:
    """Client threads posting completions in a loop (no retry: a refusal stays an error)."""

    def __init__(self, url: str, model: str, threads: int = 6):
        self.url, self.model = url, model
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            prompt = f"load {i} {n} " + "x" * 20
            body = {"model": self.model, "prompt": prompt, "max_tokens": 24, "temperature": 0}
            try:
                r = requests.post(self.url + "/v1/completions", json=body, timeout=120)
                choice = r.json()["choices"][0] if r.status_code == 200 else None
                full = choice is not None and choice["text"] == prompt[:24]
                outcome = None if full else f"{r.status_code} {r.text[:200]}"
            except (requests.RequestException, ValueError, KeyError) as e:
                outcome = repr(e)
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.errors.append(outcome)
            n += 1

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(150)
        assert not any(t.is_alive() for t in self._threads), "a request never ended (lost)"


def workers(launcher: int) -> list[psutil.Process]:
    """The launcher's two workers (its children running ``plait serve``)."""
    found = [p for p in psutil.Process(launcher).children() if "plait.server.cli" in p.cmdline()]
    assert len(found) == 2, found
    return found


def busy(port: int, grpc_mode: bool) -> int:
    if grpc_mode:
        return running_on(port)
    url = f"http://127.0.0.1:{port}/get_server_info"
    return requests.get(url, timeout=30).json()["num_running_reqs"]


@pytest.mark.parametrize("grpc_mode", [False, True], ids=["http", "grpc"])
def test_sigterm_of_one_dp_worker_under_load_loses_no_request(tiny_model_dir, tmp_path, grpc_mode):
    extra = ["--grpc-mode"] if grpc_mode else []
    server = start_server(
        [*FAKE, "--dp", "2", "--router-policy", "round_robin", *extra],
        tmp_path / "dp.log",
        str(tiny_model_dir),
        env={"FAKE_ENGINE_TOKEN_DELAY": "0.01"},
        timeout=300,
    )
    try:
        wait_for_workers(server, 2)
        model = requests.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        victim, other = workers(server.proc.pid)
        port = port_of(victim)
        scheme = "grpc" if grpc_mode else "http"
        gone, kept = f"{scheme}://127.0.0.1:{port}", f"{scheme}://127.0.0.1:{port_of(other)}"
        with Load(server.url, model) as load:
            time.sleep(STEADY)
            # signal it while it runs requests: the drain finishes them
            took, running = sigterm_when_busy(
                victim, lambda: busy(port, grpc_mode), EXIT_BOUND, tries=100
            )
            still_listed = gone in [w["url"] for w in listed(server)]
            before = load.ok
            time.sleep(STEADY)
        assert server.proc.poll() is None, "the launch stopped"
        healthy_after = listed_healthy(server.url)
        code = launcher_exit_code(server.log, port)
    finally:
        server.stop()
    print(
        f"dp drain ({scheme}): {load.ok} answered, {len(load.errors)} errors, "
        f"{running} running at SIGTERM, exit {code} after {took:.1f}s, "
        f"listed after its exit: {still_listed}"
    )
    assert not still_listed, "the gateway still lists the drained worker"
    assert not load.errors, (len(load.errors), load.errors[:3])
    assert running, "the worker ran nothing when signalled: the drain was not exercised"
    assert code == 0
    assert healthy_after == {kept}, healthy_after
    assert load.ok > before > 0  # the other worker kept serving
