"""Offline decode speed of named configurations against a baseline, all in one process.

    python -m benchmarks.offline --list                              # the presets
    python -m benchmarks.offline --compare mkl-eager prepacked       # make bench-cpu
    python -m benchmarks.offline --compare fp32 gguf gguf-a8 int8 --workloads batch1,batch16
    python -m benchmarks.offline --compare overlap-off overlap --phases
    python -m benchmarks.offline --compare tp1 tp2 --metric decode --workloads batch1,batch16 \\
        --prompt-len 8
    python -m benchmarks.offline --compare transformers plait --quick

Every preset's engine is built first and stays up; then, workload by workload, each round runs
every engine once in ABBA order (``harness.alternate``), so a neighbour's load on a shared
machine hits all columns alike. A cell is the median of ``--rounds`` values; the table gives
each preset's ratio to the first (the baseline). Workloads are ``harness.make_workloads``
(random token ids from ``--seed``, greedy, EOS ignored). ``--metric throughput`` (default) is
each workload's own rate over one whole ``generate`` call (tok/s, or req/s for the shared
prefix); ``--metric decode`` is ``harness.decode_rate``, prefill subtracted. ``--phases`` adds
the engine's step split (ms per forward pass; ``exposed`` = wall - forward: the scheduler's
share of a step, which the overlap schedule hides).

Threads: each engine is built with this process's torch thread count and runs with the count
the process had right after it was built (a tp 2 engine sets its rank-0 share). Warm-up:
four short requests per engine, or every workload in full for a preset that compiles per
shape (``tpu-jax``). Presets and the old scripts they replace: ``benchmarks/presets.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics

from typing import TYPE_CHECKING

import torch

from benchmarks import harness
from benchmarks.presets import PRESETS, Preset, parse_presets

if TYPE_CHECKING:
    from plait.backends.cpu.plugin import CpuOptions

PHASE_ROWS = ("wall_ms", *(f"{p}_ms" for p in harness.PHASES), "exposed_ms", "tokens_per_pass")


class PeerEngine:
    """A peer worker's ``Serve`` (``benchmarks/peers/workers``) behind the engine surface the
    harness times: ``generate(input_ids=, sampling_params=)`` and ``flush_cache``."""

    def __init__(self, serve):
        self.serve = serve

    def generate(self, *, input_ids: list[list[int]], sampling_params: list[dict]) -> list:
        return self.serve.generate(
            [(p, sp["max_new_tokens"]) for p, sp in zip(input_ids, sampling_params)]
        )

    def flush_cache(self) -> None:
        self.serve.reset()

    def shutdown(self) -> None:
        pass


def cpu_options(switches: dict) -> "CpuOptions | None":
    """The ``CpuOptions`` a preset's ``cpu`` switches name (TypeError: a stale preset), or
    None for the backend's defaults."""
    if not switches:
        return None
    from plait.backends.cpu.plugin import CpuOptions

    return CpuOptions(**switches)


def build(preset: Preset, args: argparse.Namespace):
    """One engine as ``preset`` says; ``--device``/``--model-path`` apply where it sets none."""
    os.environ.update(preset.env)  # kept for the run: a backend may read it after start
    if preset.peer == "transformers":
        from benchmarks.peers.workers.run_transformers import load
        from plait.models.default import default_model_path

        job = {
            "model_dir": str(args.model_path or default_model_path()),
            "threads": torch.get_num_threads(),
            "seed": args.seed,
        }
        return PeerEngine(load(job))
    import plait

    options = cpu_options(preset.cpu)
    engine_args = {"device": args.device, **preset.engine}
    if options is not None:
        engine_args["backend_options"] = options
    if preset.lora_adapters:
        from benchmarks import lora

        return lora.build(args.model_path, preset.lora_adapters, 8, **engine_args)
    return plait.Engine(model_path=args.model_path, **engine_args)


def preset_threads(preset: Preset) -> int:
    """The torch threads a preset's engine runs its forward with in this process: rank 0's
    share of the cores under tensor parallelism (the engine's start-up hands the caller its
    own thread count back, so it cannot be read off torch), else this process's threads."""
    tp_size = int(preset.engine.get("tp_size", 1))
    if tp_size > 1:
        from plait.core.tp.launcher import cores_of_rank

        return len(cores_of_rank(0, tp_size))
    return torch.get_num_threads()


def build_all(
    presets: list[Preset], args: argparse.Namespace, workloads: list[harness.Workload]
) -> tuple[dict, dict[str, int]]:
    """Every preset's engine, warmed up, and the torch threads each runs with."""
    base_threads = torch.get_num_threads()
    engines, threads = {}, {}
    short = harness.seeded_requests(4, (16, 16), (8, 8), seed=-1)
    try:
        for p in presets:
            torch.set_num_threads(base_threads)
            engines[p.name] = build(p, args)
            threads[p.name] = preset_threads(p)
        for p in presets:
            torch.set_num_threads(threads[p.name])
            for reqs in [w.requests for w in workloads] if p.full_warmup else [short]:
                harness.serve_seconds(engines[p.name], reqs)
    except BaseException:
        shutdown(engines)
        raise
    return engines, threads


def shutdown(engines: dict) -> None:
    for engine in engines.values():
        engine.shutdown()


def measure(
    engine, workload: harness.Workload, metric: str, phases: bool
) -> tuple[float, dict[str, float]]:
    """One value of ``metric`` on ``workload``, and with ``phases`` the step split."""
    if metric == "decode":
        return harness.decode_rate(engine, workload), {}
    before = harness.step_totals(engine.get_server_info()) if phases else None
    seconds = harness.serve_seconds(engine, workload.requests)
    split: dict[str, float] = {}
    if before is not None:
        split = harness.phase_split(before, harness.step_totals(engine.get_server_info()))
        split["wall_ms"] = 1000 * seconds / max(1.0, split["passes"])
        split["exposed_ms"] = split["wall_ms"] - split["forward_ms"]
    return workload.rate(seconds), split


def row_label(workload: harness.Workload, metric: str) -> str:
    if metric == "decode":
        return workload.title.rsplit(" (", 1)[0] + " (decode tok/s, prefill subtracted)"
    return workload.title


def run(
    engines: dict,
    threads: dict[str, int],
    workloads: list[harness.Workload],
    args: argparse.Namespace,
) -> tuple[list, list]:
    """The timed rounds: (table rows, phase rows), medians per workload and preset."""
    names = list(engines)
    rows, phase_rows = [], []
    for w in workloads:
        values: dict[str, list[float]] = {n: [] for n in names}
        splits: dict[str, list[dict]] = {n: [] for n in names}
        for _, name in harness.alternate(names, args.rounds):
            torch.set_num_threads(threads[name])
            value, split = measure(engines[name], w, args.metric, args.phases)
            values[name].append(value)
            splits[name].append(split)
        itl: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for _, name in harness.alternate(names, args.rounds) if args.itl else ():
            torch.set_num_threads(threads[name])
            itl[name].append(harness.itl_ms(engines[name], w.requests))
        med = {n: statistics.median(values[n]) for n in names}
        print(f"  {w.name}: " + ", ".join(f"{n} {med[n]:.2f}" for n in names), flush=True)
        rows.append((row_label(w, args.metric), med))
        for k, label in enumerate(("p50", "p99") if args.itl else ()):
            cell = {n: statistics.median(v[k] for v in itl[n]) for n in names}
            rows.append((f"{w.name}: ITL {label} (ms, streamed run)", cell))
        if args.phases:
            split_med = {n: harness.medians(splits[n]) for n in names}
            phase_rows += [
                (f"{w.name} {key}", {n: split_med[n][key] for n in names}) for key in PHASE_ROWS
            ]
    return rows, phase_rows


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[Preset]]:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.offline", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="PRESET",
        help="the baseline preset, then the presets to compare with it",
    )
    ap.add_argument("--list", action="store_true", help="print the presets and exit")
    ap.add_argument(
        "--workloads",
        default=None,
        help="comma-separated names (default: all: batch<B>..., mixed, shared_prefix)",
    )
    ap.add_argument("--batches", default=None, help="batch sizes, e.g. 1,16,64 (the default)")
    ap.add_argument("--new", type=int, default=None, help="new tokens per batch request (64)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per batch request")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per engine (median)")
    ap.add_argument("--quick", action="store_true", help="tiny workloads, 1 round")
    ap.add_argument("--metric", choices=("throughput", "decode"), default="throughput")
    ap.add_argument(
        "--phases",
        action="store_true",
        help="also the step split per forward pass (--metric throughput)",
    )
    ap.add_argument(
        "--itl",
        action="store_true",
        help="also inter-token latency p50/p99 (ms) from a streamed run per round "
        "(harness.itl_ms; Plait presets only)",
    )
    ap.add_argument("--device", default="cpu", help="for presets that set no device")
    ap.add_argument("--model-path", default=None, help="default: the bundled default model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.list:
        return args, []
    if args.rounds < 1 or args.prompt_len < 1 or (args.new is not None and args.new < 2):
        ap.error("--rounds and --prompt-len must be >= 1, --new >= 2")
    if args.phases and args.metric != "throughput":
        ap.error("--phases needs --metric throughput (decode_rate serves each workload twice)")
    try:
        presets = parse_presets(args.compare or [])
    except ValueError as e:
        ap.error(str(e))
    if args.phases and any(p.peer for p in presets):
        ap.error("--phases: a peer (transformers) has no step counters")
    if args.itl and any(p.peer for p in presets):
        ap.error("--itl: a peer (transformers) does not stream here")
    args.rounds = 1 if args.quick else args.rounds
    return args, presets


def select_workloads(args: argparse.Namespace) -> list[harness.Workload]:
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    every = harness.make_workloads(args.quick, args.seed, args.new, batches, args.prompt_len)
    if not args.workloads:
        return every
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    known = {w.name: w for w in every}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(
            f"--workloads: unknown {unknown or 'empty list'}; choose from {','.join(known)}"
        )
    return [known[n] for n in names]


def main(argv: list[str] | None = None) -> None:
    args, presets = parse_args(argv)
    if args.list:
        for p in PRESETS.values():
            print(f"{p.name:<18} {p.about}")
        return
    workloads = select_workloads(args)
    engines, threads = build_all(presets, args, workloads)
    try:
        rows, phase_rows = run(engines, threads, workloads, args)
        infos = {
            p.name: {k: engines[p.name].get_server_info().get(k) for k in p.info}
            for p in presets
            if p.info
        }
    finally:
        shutdown(engines)
    base = presets[0].name
    print(
        f"\n{args.model_path or 'SmolLM2-135M-Instruct'}, device {args.device} (where a "
        f"preset sets none), torch threads {threads}, median of {args.rounds} round(s) in "
        f"ABBA order, metric {args.metric}\n"
    )
    print(harness.table(rows, base, fmt="{:.2f}"))
    if phase_rows:
        print("\nms per forward pass (tokens_per_pass: generated tokens per pass)\n")
        print(harness.table(phase_rows, base, fmt="{:.2f}"))
    for name, info in infos.items():
        print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    main()
