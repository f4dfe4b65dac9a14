"""What `make run` shows a newcomer: the server answering a chat request, then a small Plait
program (gen, select, fork/join) running against that same server.

    .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import plait as pl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"plait serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit("plait serve did not become healthy in time")


def chat(url: str, content: str) -> dict:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        model = json.load(resp)["data"][0]["id"]
    body = json.dumps(
        {
            "model": model,
            "max_tokens": 96,
            "temperature": 0,
            "messages": [{"role": "user", "content": content}],
        }
    ).encode()
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.load(resp)


@pl.function
def travel_plan(s, city):
    s += pl.user(f"I am visiting {city}. Is it better to go by train or by plane?")
    s += pl.assistant(pl.select("mode", choices=["train", "plane"]))
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += pl.user(f"Give tip number {i + 1} for a trip to {city}, in one sentence.")
        f += pl.assistant(pl.gen("tip", max_tokens=32, stop="\n"))
    forks.join()


def main() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plait.server.cli",
            "serve",
            "--model-path",
            "default",
            "--port",
            str(port),
        ]
    )
    try:
        wait_healthy(url, server)
        question = "Give me three tips for learning a new language."
        answer = chat(url, question)
        print(f"\n>>> {question}\n{answer['choices'][0]['message']['content']}")
        print(f"[usage: {answer['usage']}]\n")

        state = travel_plan.run(city="Paris", backend=pl.RuntimeEndpoint(url), temperature=0)
        print(">>> a Plait program: select + fork/join against the same server")
        print(f"mode: {state['mode']}")
        for tip in state["tip"]:
            print(f"tip: {tip.strip()}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
