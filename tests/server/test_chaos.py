"""Chaos under steady mixed load through SGLang's gateway (smg, the ``--dp`` default).

``plait serve --dp 2`` with fake engines (each a real worker: HTTP process, scheduler process,
IPC directory) while client threads send a steady mix of streaming and non-streaming requests
on ``/generate``, ``/v1/completions`` and ``/v1/chat/completions``. At random times (seeded) a
worker is killed with SIGKILL and a replacement is started with ``plait serve --join``, as a
supervisor would. What must hold:

- every request ends within ``BOUND`` seconds, as a full answer (200, a finish reason, and for
  a stream ``[DONE]`` with no error event) or a clear error (a 4xx/5xx with a body, or a
  stream's error event followed by ``[DONE]``); anything else is lost, and lost must be 0;
- after the chaos the fleet serves again within ``RECOVER`` seconds;
- no IPC directory is left once everything has stopped (a killed worker's orphaned scheduler
  removes its own).

The launcher's second worker is never killed: the launcher stops when every worker it started
has exited (``children.supervise``); replacements join the gateway by themselves.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from plait.server.children import PortBook
from plait.server.gateway import listed_healthy
from tests.server.conftest import FAKE, REPO, start_server
from tests.server.test_data_parallel import child_pids

pytestmark = pytest.mark.slow

BOUND = 60.0  # seconds any one request may take, answer or error
RECOVER = 120.0  # seconds for the fleet to serve again after the last kill
#: seeded kills land at 7, 15, 20 and 27 s: 4 kills, each with a replacement joining under
#: load (PLAIT_CHAOS_SECONDS=120 for a longer run)
LOAD_SECONDS = float(os.environ.get("PLAIT_CHAOS_SECONDS", "30"))
CLIENTS = 6
DELAY = {"FAKE_ENGINE_TOKEN_DELAY": "0.02"}


def wait_for_workers(server, count: int, timeout: float = 300) -> None:
    """smg answers on its port before it lists its workers: wait for the pool itself."""
    deadline = time.monotonic() + timeout
    while len(listed_healthy(server.url)) < count:
        assert server.proc.poll() is None and time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.5)


def classify_stream(resp: requests.Response) -> str:
    events, finished = [], False
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            events.append(line[6:])
    if not events or events[-1] != b"[DONE]":
        return "lost"  # cut without [DONE]
    parsed = [json.loads(e) for e in events[:-1]]
    if any("error" in p for p in parsed):
        return "error"
    for p in parsed:
        choices = p.get("choices") or [{}]
        finished |= bool(
            choices[0].get("finish_reason") or p.get("meta_info", {}).get("finish_reason")
        )
    return "answered" if finished else "lost"


def classify(resp: requests.Response, stream: bool) -> str:
    if resp.status_code >= 400:
        return "error" if resp.content else "lost"
    if resp.status_code != 200:
        return "lost"
    if stream:
        return classify_stream(resp)
    body = resp.json()
    reason = (body.get("choices") or [{}])[0].get("finish_reason") or body.get("meta_info", {}).get(
        "finish_reason"
    )
    return "answered" if reason else "lost"


def request(url: str, model: str, i: int) -> tuple[str, str, float]:
    """One request of the mix; (kind, outcome, seconds)."""
    kind = ["generate", "chat-stream", "completions", "generate-stream"][i % 4]
    stream = kind.endswith("stream")
    text = f"chaos request {i} " * 4
    if kind.startswith("generate"):
        path = "/generate"
        body: dict = {"text": text, "sampling_params": {"max_new_tokens": 24}, "stream": stream}
    elif kind.startswith("chat"):
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        body |= {"max_tokens": 24, "stream": stream}
    else:
        path = "/v1/completions"
        body = {"model": model, "prompt": text, "max_tokens": 24, "stream": stream}
    t0 = time.monotonic()
    try:
        with requests.post(url + path, json=body, stream=stream, timeout=BOUND) as resp:
            outcome = classify(resp, stream)
    except (requests.RequestException, ValueError) as e:
        outcome = f"lost: {type(e).__name__}"
    elapsed = time.monotonic() - t0
    return kind, outcome if elapsed <= BOUND else "lost: over the bound", elapsed


def join_worker(model_dir: Path, gateway: str, port: int, log: Path, env: dict):
    cmd = [
        sys.executable, "-m", "plait.server.cli", "serve", *FAKE,
        "--model-path", str(model_dir), "--port", str(port), "--join", gateway,
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def test_kill_9_and_restart_workers_under_steady_load(tiny_model_dir, tmp_path):
    tmp = tmp_path / "tmp"  # the IPC directories of every worker land here
    tmp.mkdir()
    env = {**os.environ, **DELAY, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    book = PortBook()
    port = book.take()
    server = start_server(
        [*FAKE, "--dp", "2", "--router-policy", "round_robin"],
        tmp_path / "dp.log",
        str(tiny_model_dir),
        env={**DELAY, "TMPDIR": str(tmp)},
        timeout=600,
        port=port,
    )
    rng = random.Random(42)
    results: list[tuple[str, str, float]] = []
    joined: list[subprocess.Popen] = []
    kills: list[float] = []
    stop = threading.Event()
    model = tiny_model_dir.name  # the served model id
    killable: list[int] = []  # the launcher's first worker, then each replacement
    counter = iter(range(10**6))
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            with lock:
                i = next(counter)
            results.append(request(server.url, model, i))

    def chaos() -> None:
        while not stop.wait(rng.uniform(4, 9)):
            alive = [p for p in killable if Path(f"/proc/{p}").exists()]
            if not alive:
                continue
            victim = rng.choice(alive)
            os.kill(victim, signal.SIGKILL)
            kills.append(time.monotonic())
            killable.remove(victim)
            n = len(joined)
            proc = join_worker(
                tiny_model_dir, server.url, book.take(), tmp_path / f"joined{n}.log", env
            )
            joined.append(proc)
            killable.append(proc.pid)

    try:  # from here on, the finally stops every process even if a step fails
        wait_for_workers(server, 2)  # smg answers before it lists its workers
        killable += [
            p for p in child_pids(server.proc.pid)
            if b"plait.server.cli" in Path(f"/proc/{p}/cmdline").read_bytes()
        ][:1]  # fmt: skip
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        threads.append(threading.Thread(target=chaos))
        for t in threads:
            t.start()
        time.sleep(LOAD_SECONDS)
        stop.set()
        for t in threads:
            t.join(BOUND + 10)
        assert not any(t.is_alive() for t in threads), "a client hung past the bound"
        # The fleet serves again: every joined worker alive and listed, requests succeed.
        deadline = time.monotonic() + RECOVER
        while True:
            healthy = listed_healthy(server.url)
            ok = [request(server.url, model, 10**6 + j)[1] for j in range(4)]
            if len(healthy) >= 2 and ok.count("answered") == 4:
                break
            assert time.monotonic() < deadline, (healthy, ok)
            time.sleep(1)
        recovered_in = time.monotonic() - kills[-1] if kills else 0.0
    finally:
        stop.set()
        for proc in joined:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        server.stop()
        for proc in joined:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    outcomes = Counter(o if not o.startswith("lost") else "lost" for _, o, _ in results)
    print(
        f"chaos: sent {len(results)}, answered {outcomes['answered']}, clear errors "
        f"{outcomes['error']}, lost {outcomes['lost']}, {len(kills)} kills, served again "
        f"{recovered_in:.1f}s after the last kill, longest request "
        f"{max(s for _, _, s in results):.1f}s"
    )
    assert len(kills) >= 3 and outcomes["answered"] > 0
    lost = [r for r in results if r[1].startswith("lost")]
    assert not lost, lost[:5]
    deadline = time.monotonic() + 30  # a killed worker's orphaned scheduler cleans up, then exits
    while list(tmp.glob("plait-ipc-*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(tmp.glob("plait-ipc-*")), list(tmp.iterdir())
