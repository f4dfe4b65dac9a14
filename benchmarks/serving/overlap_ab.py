"""Alternate two running servers on one workload and split each run's step into its phases.

``benchmarks.serving.serving --launch`` runs the baseline once and then the candidate once, so a
host that slows down during the run (or warms up) reads as a difference between the two. This
script starts both servers once, then runs the workload on them in ABBA order for ``--rounds``
rounds, and for every run reads the engine's phase totals from ``/get_server_info`` before
and after. It prints, per configuration, the medians of the serving metrics and the mean
milliseconds per forward pass of each phase (schedule, forward, sample, process, wait), and
tokens per pass, so a slower configuration shows where its step grew.

Example (the overlap schedule's own effect, the GPU lease's ``serving_overlap_ab`` stage):
    python -m benchmarks.serving.overlap_ab --model-path M --rounds 3 \\
        --baseline-args "--device cuda --disable-overlap-schedule" \\
        --candidate-args "--device cuda" --dataset random --num-prompts 256 \\
        --input-len 256 --output-len 128 --max-concurrency 64
"""

from __future__ import annotations

import argparse

import httpx

from benchmarks.harness import PHASES, alternate, medians, phase_split, step_totals
from benchmarks.serving import serving


def engine_totals(url: str) -> dict[str, float]:
    """The engine's cumulative step counters (the same ones /metrics exports)."""
    return step_totals(httpx.get(url + "/get_server_info", timeout=30).json())


def one_run(url: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    before = engine_totals(url)
    result = serving.bench(url, args, vocab)
    return {**result, **phase_split(before, engine_totals(url))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-path", default="default")
    p.add_argument("--baseline-args", required=True)
    p.add_argument("--candidate-args", required=True)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs both twice)")
    serving.add_workload_arguments(p)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.request_rate = float("inf")
    args.warmup = True
    names = ("baseline", "candidate")
    servers = {}
    try:
        for name, extra in zip(names, (args.baseline_args, args.candidate_args)):
            servers[name] = serving.launch(extra, args)
        vocab = httpx.get(servers["baseline"][1] + "/get_model_info", timeout=30).json()[
            "vocab_size"
        ]
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r, name in alternate(names, args.rounds):
            run = one_run(servers[name][1], args, vocab)
            runs[name].append(run)
            print(
                f"round {r + 1} {name:<9} {run['output_tok_per_s']:9.1f} tok/s  "
                f"TTFT {run['ttft_median_ms']:7.1f} ms  ITL {run['itl_median_ms']:6.2f} ms"
                f"  passes {run['passes']:.0f}  tok/pass {run['tokens_per_pass']:.1f}  "
                + " ".join(f"{ph}={run[ph + '_ms']:.2f}" for ph in PHASES),
                flush=True,
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    print()
    print(f"baseline:  plait serve {args.baseline_args}")
    print(f"candidate: plait serve {args.candidate_args}")
    print(f"medians of {args.rounds} runs each, ABBA order")
    summary = {n: medians(runs[n]) for n in names}
    serving.print_table(list(summary.items()))
    print(f"{'ms per forward pass':<30}" + "".join(f"{n:>16}" for n in names))
    for key in [f"{ph}_ms" for ph in PHASES] + ["tokens_per_pass", "passes"]:
        print(f"{key:<30}" + "".join(f"{summary[n][key]:>16.2f}" for n in names))


if __name__ == "__main__":
    main()
