"""The engine's host path per decode step, measured with the null model (issue 41).

    .venv/bin/python -m benchmarks.host_path --batch 1 64 256 --steps 64 --rounds 3

The null model's forward costs nothing (``plait/models/null.py``), so a decode step's wall time
is what the engine itself spends: scheduling, batch building, KV bookkeeping, sampling (or the
greedy tokens' hand-back), output processing and the caller's side (detokenization, result
assembly). Per batch size the workload (16-token random prompts, ``--steps`` new tokens, EOS
ignored) is served twice, with one new token and with all of them, and the host time per decode
step is ``(full - first) / (steps - 1)`` (:func:`benchmarks.harness.decode_rate`'s subtraction).
Rounds alternate over the batch sizes; figures are medians. The phase split (ms per forward
pass) comes from the scheduler's own counters over the full runs.

``--sampled`` uses temperature 0.7 instead of greedy, so every step also samples from a full
vocabulary of logits (the null model hands them over at no cost).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import plait
from benchmarks.harness import PHASES, alternate, phase_split, step_totals
from plait.models.default import default_model_path
from plait.models.null import make_null_checkpoint


def _params(batch: int, new_tokens: int, sampled: bool) -> list[dict]:
    temperature = 0.7 if sampled else 0.0
    return [
        {"max_new_tokens": new_tokens, "temperature": temperature, "ignore_eos": True, "seed": i}
        for i in range(batch)
    ]


def _serve(engine: plait.Engine, batch: int, new_tokens: int, sampled: bool) -> tuple[float, float]:
    """Wall and process CPU seconds (every thread) of one call."""
    ids = [[1000 + 17 * i + j for j in range(16)] for i in range(batch)]
    engine.flush_cache()
    start, cpu = time.perf_counter(), time.process_time()
    engine.generate(input_ids=ids, sampling_params=_params(batch, new_tokens, sampled))
    return time.perf_counter() - start, time.process_time() - cpu


def measure(engine: plait.Engine, batch: int, steps: int, sampled: bool) -> dict[str, float]:
    """Host ms per decode step at ``batch`` (wall, and CPU of all the process's threads: on a
    shared machine the CPU figure is what the engine spent, the wall one includes waiting for
    a core), and the phase split of the full run."""
    first, first_cpu = _serve(engine, batch, 1, sampled)
    before = step_totals(engine.get_server_info())
    full, full_cpu = _serve(engine, batch, steps, sampled)
    split = phase_split(before, step_totals(engine.get_server_info()))
    per_step = 1000 / (steps - 1)
    return {
        "step_ms": per_step * (full - first),
        "cpu_ms": per_step * (full_cpu - first_cpu),
        **split,
    }


@contextlib.contextmanager
def null_engine(max_batch: int, steps: int, disable_overlap: bool) -> Iterator[plait.Engine]:
    """An engine on the null model (a temporary checkpoint shaped like the default model's
    config) sized for ``max_batch`` requests of ``steps`` decode steps; shut down on exit."""
    with tempfile.TemporaryDirectory(prefix="plait-null-") as tmp:
        path = make_null_checkpoint(Path(tmp), default_model_path())
        engine = plait.Engine(
            str(path),
            max_running_requests=max_batch,
            max_total_tokens=max_batch * (16 + steps + 16),
            disable_overlap_schedule=disable_overlap,
        )
        try:
            yield engine
        finally:
            engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sampled", action="store_true", help="temperature 0.7, not greedy")
    ap.add_argument("--disable-overlap-schedule", action="store_true")
    args = ap.parse_args()
    with null_engine(max(args.batch), args.steps, args.disable_overlap_schedule) as engine:
        _serve(engine, max(args.batch), 4, args.sampled)  # warm-up
        runs: dict[int, list[dict[str, float]]] = {b: [] for b in args.batch}
        for _, batch in alternate(args.batch, args.rounds):
            runs[batch].append(measure(engine, batch, args.steps, args.sampled))
    mode = "sampled (temperature 0.7)" if args.sampled else "greedy"
    overlap = "off" if args.disable_overlap_schedule else "on"
    print(f"null model, {mode}, overlap {overlap}, {args.steps} steps, {args.rounds} rounds")
    cols = ["step_ms", "cpu_ms"] + [f"{p}_ms" for p in PHASES]
    print("| batch | host ms/step | host CPU ms/step | " + " | ".join(cols[2:]) + " |")
    print("|---:|" + "---:|" * len(cols))
    for batch in args.batch:
        med = {c: statistics.median(r[c] for r in runs[batch]) for c in cols}
        print(f"| {batch} | " + " | ".join(f"{med[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
