"""Fixtures that run ``plait serve`` as a real subprocess on a free loopback port.

``fake_server``: the HTTP stack with ``FakeEngine`` behind it (seconds, no model).
``real_server`` (tests/conftest.py, shared with the frontend's HTTP tests): the real
SmolLM2-135M-Instruct on CPU (marked slow by the tests using it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from plait.server.data_parallel import free_port  # re-exported for the server tests

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    model_path: str
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers(), timeout=120, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("headers", self.headers())
        return requests.post(self.url + path, timeout=300, **kw)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    args: list[str],
    log: Path,
    model_path: str,
    api_key: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    port: int | None = None,
) -> Server:
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "plait.server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-path",
        model_path,
        "--log-level",
        "warning",
        *args,
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log, model_path, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"plait serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"plait serve did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.server.fake_engine import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


FAKE = ["--engine-factory", "tests.server.fake_engine:FakeEngine"]


@pytest.fixture(scope="session")
def fake_server(tiny_model_dir, tmp_path_factory):
    server = start_server(
        FAKE, tmp_path_factory.mktemp("logs") / "fake.log", str(tiny_model_dir), timeout=120
    )
    yield server
    server.stop()


def _real_model_path() -> str:
    from plait.models.default import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="session")
def real_model_path() -> str:
    return _real_model_path()
