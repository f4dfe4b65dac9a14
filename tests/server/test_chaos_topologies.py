"""Chaos beyond ``--dp`` workers: kill -9 a tensor-parallel rank, a prefill and a decode server
under ``--pd`` (smg, the default gateway), and the gateway itself, under steady mixed load.

Each test runs one topology on a tiny random Llama checkpoint (TP, PD) or the fake engine (the
gateway), with client threads sending the mix of ``test_chaos.request`` for ``LOAD_SECONDS``;
the test plays the supervisor, restarting what was killed (or what stopped because of it) on
the same address. Each request ends as one of:

- answered: a full answer; error: a clear HTTP error with a body, or a stream's error event
  then ``[DONE]``;
- connection error: the client's connection was refused, reset or closed mid-answer by a
  process that is gone (the gateway, or a server that stopped for its supervisor): the client
  knows at once, nothing hangs;
- lost: anything else (a hang past ``BOUND``, a 200 cut short while every process it
  talked to lived, a stream with no ``[DONE]``); lost must be 0.

After the chaos the fleet serves again within ``RECOVER`` seconds of the kill, every KV slot is
free, and no IPC directory is left once everything has stopped.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from plait.server.data_parallel import free_port
from tests.server.conftest import FAKE, REPO, start_server
from tests.server.test_chaos import BOUND, request, wait_for_workers

pytestmark = pytest.mark.slow

LOAD_SECONDS = 20.0
CLIENTS = 4
RECOVER = 180.0  # seconds from a kill until the fleet answers again (a restart on 2 busy cores)
EXIT_BOUND = 30.0  # seconds for a process that must stop to stop
CONNECTION = ("lost: ConnectionError", "lost: ChunkedEncodingError")


class Load:
    """Client threads sending the chaos mix to ``url`` until :meth:`stop`."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.results: list[tuple[str, str, float]] = []
        self._stop = threading.Event()
        self._count = iter(range(10**6))
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]

    def _client(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                i = next(self._count)
            kind, outcome, seconds = request(self.url, self.model, i)
            if outcome in CONNECTION:
                outcome = "connection error"
                time.sleep(0.5)  # a refused connection returns at once: do not spin
            elif outcome == "error":
                time.sleep(0.1)  # nor on the gateway's immediate errors (CPU the restart needs)
            self.results.append((kind, outcome, seconds))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(BOUND + 10)
        assert not any(t.is_alive() for t in self._threads), "a client hung past the bound"

    def report(self, what: str) -> Counter:
        outcomes = Counter(o if not o.startswith("lost") else "lost" for _, o, _ in self.results)
        print(
            f"chaos {what}: sent {len(self.results)}, answered {outcomes['answered']}, clear "
            f"errors {outcomes['error']}, connection errors {outcomes['connection error']}, "
            f"lost {outcomes['lost']}, longest request "
            f"{max((s for _, _, s in self.results), default=0):.1f}s"
        )
        lost = [r for r in self.results if r[1].startswith("lost")]
        assert not lost, lost[:5]
        assert outcomes["answered"] > 0
        return outcomes


def serves(url: str, model: str) -> bool:
    return all(request(url, model, 10**6 + j)[1] == "answered" for j in range(4))


def wait_serving(url: str, model: str, since: float) -> float:
    """Seconds from ``since`` until four requests in a row are answered, within RECOVER."""
    while not serves(url, model):
        assert time.monotonic() - since < RECOVER, f"{url} not serving {RECOVER:.0f}s after"
        time.sleep(0.5)
    took = time.monotonic() - since
    assert took < RECOVER, f"{url} served again only {took:.0f}s after the kill"
    return took


def kv_all_free(url: str) -> None:
    info = requests.get(url + "/get_server_info", timeout=30).json()
    free = info["available_kv_tokens"] + info["evictable_kv_tokens"]
    assert free == info["max_total_tokens"], info


def no_ipc_left(tmp: Path) -> None:
    deadline = time.monotonic() + 30  # an orphaned scheduler cleans up, then exits
    while list(tmp.glob("plait-ipc-*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(tmp.glob("plait-ipc-*")), list(tmp.iterdir())


def descendants(pid: int, needle: str) -> list[psutil.Process]:
    """Live descendants of ``pid`` with ``needle`` as one of their arguments."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if needle in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def restart(cmdline: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """What a supervisor does: the same command again, on the same address."""
    return subprocess.Popen(
        cmdline, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
    )


def stopped_with_its_tree(server, tree: list[psutil.Process], killed: float) -> tuple[int, float]:
    """Wait for the launch to exit non-zero after a kill at ``killed`` and for every process
    it had (``tree``) to be gone; its exit code and the seconds it took to stop."""
    code = server.proc.wait(EXIT_BOUND)
    stopped_in = time.monotonic() - killed
    assert code != 0
    _, alive = psutil.wait_procs(tree, timeout=EXIT_BOUND)
    assert not alive, f"left running: {alive}"
    return code, stopped_in


def test_kill_9_a_tp_rank_ends_in_flight_requests_and_stops_for_a_restart(
    make_tiny_model, tmp_path
):
    """A dead rank breaks the group for good (its collectives cannot be rejoined), so the
    server ends every in-flight request with an error, then exits non-zero and leaves nothing
    running; the supervisor's restart serves again."""
    model_dir = make_tiny_model("llama")
    model = model_dir.name
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    args, port = ["--device", "cpu", "--tp", "2", "--max-total-tokens", "4096"], free_port()
    server = start_server(args, tmp_path / "tp.log", str(model_dir), env=env, port=port)
    rng = random.Random(7)
    try:
        with Load(server.url, model) as load:
            time.sleep(rng.uniform(3, 8))
            tree = psutil.Process(server.proc.pid).children(recursive=True)
            (rank,) = [p for p in tree if "plait.core.tp.worker" in p.cmdline()]
            rank.kill()
            killed = time.monotonic()
            code, stopped_in = stopped_with_its_tree(server, tree, killed)
            server = start_server(args, tmp_path / "tp2.log", str(model_dir), env=env, port=port)
            recovered_in = wait_serving(server.url, model, killed)
            time.sleep(max(0.0, LOAD_SECONDS - (time.monotonic() - killed)))
        kv_all_free(server.url)
    finally:
        server.stop()
    print(f"tp: exit {code} {stopped_in:.1f}s after the kill, serving again {recovered_in:.1f}s")
    outcomes = load.report("tp rank")
    assert outcomes["error"] > 0, "the kill hit no in-flight request"
    no_ipc_left(tmp)


def test_kill_9_the_gateway_gives_connection_errors_and_a_restart_serves(tiny_model_dir, tmp_path):
    """The launcher stops when its gateway dies (``children.supervise``) and stops its
    workers; the supervisor restarts the launch on the same port."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "FAKE_ENGINE_TOKEN_DELAY": "0.02"}
    args, port = [*FAKE, "--dp", "2", "--router-policy", "round_robin"], free_port()
    model = tiny_model_dir.name
    server = start_server(args, tmp_path / "dp.log", str(tiny_model_dir), env=env, port=port)
    rng = random.Random(11)
    try:
        wait_for_workers(server, 2)
        with Load(server.url, model) as load:
            time.sleep(rng.uniform(3, 8))
            tree = psutil.Process(server.proc.pid).children(recursive=True)
            kids = psutil.Process(server.proc.pid).children()
            (gateway,) = [p for p in kids if "plait.server.cli" not in p.cmdline()]
            gateway.kill()
            killed = time.monotonic()
            code, stopped_in = stopped_with_its_tree(server, tree, killed)
            server = start_server(
                args, tmp_path / "dp2.log", str(tiny_model_dir), env=env, port=port
            )
            wait_for_workers(server, 2)
            recovered_in = wait_serving(server.url, model, killed)
            time.sleep(max(0.0, LOAD_SECONDS - (time.monotonic() - killed)))
    finally:
        server.stop()
    print(f"gateway: launcher exit {code} {stopped_in:.1f}s after, serving {recovered_in:.1f}s")
    outcomes = load.report("gateway")
    assert outcomes["connection error"] > 0, "the kill hit no request"
    no_ipc_left(tmp)


def test_kill_9_a_prefill_then_a_decode_server_under_smg(make_tiny_model, tmp_path):
    """smg keeps answering while a PD server is down (errors with a body), and takes each
    server back once its supervisor restarts it on the same address; the launch itself keeps
    running throughout (``children.supervise``: a replacement answers on the address). Three
    long streams (one per route) running when the decode server dies each end with an error
    event and ``[DONE]``."""
    model_dir = make_tiny_model("llama")
    model = model_dir.name
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    args = ["--device", "cpu", "--pd", "1P1D", "--max-total-tokens", "4096"]
    server = start_server(args, tmp_path / "pd.log", str(model_dir), env=env, timeout=600)
    rng = random.Random(5)
    replacements: list[subprocess.Popen] = []
    recovered: dict[str, float] = {}
    try:
        wait_for_workers(server, 2)
        with Load(server.url, model) as load:
            for mode in ("prefill", "decode"):
                time.sleep(rng.uniform(3, 6))
                (victim,) = descendants(server.proc.pid, mode) or [
                    psutil.Process(p.pid) for p in replacements if mode in p.args
                ]
                cmdline, url = victim.cmdline(), f"http://127.0.0.1:{port_of(victim)}"
                streams = open_long_streams(server.url, model) if mode == "decode" else []
                victim.kill()
                killed = time.monotonic()
                victim.wait(EXIT_BOUND)
                assert_cut_with_an_error_event_and_done(streams)
                replacements.append(restart(cmdline, tmp_path / f"{mode}2.log", env))
                recovered[mode] = wait_serving(server.url, model, killed)
                assert server.proc.poll() is None, "the launch stopped"
                assert requests.get(url + "/health", timeout=5).status_code == 200
            time.sleep(rng.uniform(3, 6))
        for proc in replacements:
            kv_all_free(f"http://127.0.0.1:{port_of(psutil.Process(proc.pid))}")
    finally:
        for proc in replacements:
            proc.send_signal(signal.SIGTERM)
        server.stop()
        for proc in replacements:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"pd: serving again {recovered} s after each kill")
    load.report("pd servers")
    no_ipc_left(tmp)


def open_long_streams(url: str, model: str) -> list[tuple]:
    """One stream per streaming route, each past its first event (decoding), long enough
    (1800 tokens) to be running when the decode server dies."""
    text, long = "a stream cut in the middle " * 4, {"ignore_eos": True, "stream": True}
    bodies = [
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 1800} | long),
        ("/v1/completions", {"model": model, "prompt": text, "max_tokens": 1800} | long),
        ("/generate", {"text": text, "stream": True, "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}}),
    ]  # fmt: skip
    opened = []
    for path, body in bodies:
        r = requests.post(url + path, json=body, stream=True, timeout=BOUND)
        assert r.status_code == 200, r.text
        lines = r.iter_lines()
        opened.append((path, r, lines, [next(ln for ln in lines if ln)]))
    return opened


def assert_cut_with_an_error_event_and_done(opened: list[tuple]) -> None:
    """Each stream cut by the decode server's death ends at the client with one error event
    and ``[DONE]`` (issue 42; smg reads the decode server's SSE body and closes it so)."""

    def rest(item: tuple) -> list[bytes]:
        _, resp, lines, got = item
        with resp:
            return got + [ln for ln in lines if ln]

    with ThreadPoolExecutor(max(1, len(opened))) as pool:
        ends = list(pool.map(rest, opened))
    for (path, *_), events in zip(opened, ends):
        assert events[-1] == b"data: [DONE]", (path, events[-3:])
        payloads = [json.loads(e[6:]) for e in events[:-1] if e.startswith(b"data: ")]
        errors = [p["error"] for p in payloads if "error" in p]
        assert len(errors) == 1 and errors[0]["message"], (path, events[-3:])
        print(f"pd stream cut on {path}: {errors[0]['message'][:80]}")


def port_of(proc: psutil.Process) -> int:
    argv = proc.cmdline()
    return int(argv[argv.index("--port") + 1])
