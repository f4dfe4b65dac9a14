"""Frontend benchmark: what the radix cache buys frontend programs, and what the interpreter
costs per primitive.

    .venv/bin/python -m benchmarks.frontend [--model-path PATH] [--questions 64]

1. few-shot QA: a 5-shot prompt (examples shared) x N questions through ``run_batch``;
2. tree of thought: per question, fork 3 thoughts, fork each into 2 continuations, pick one;
both with the radix cache (plait default) and without it (``disable_radix_cache=True``, the
baseline), same machine, same run. 3. interpreter overhead per primitive against a backend
that answers instantly, so only frontend time is measured.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import plait.frontend as pl
from plait.frontend.chat_template import chatml
from plait.frontend.choices import ChoicesDecision

EXAMPLES = [
    ("What is the capital of France?", "Paris"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the boiling point of water in Celsius?", "100 degrees"),
    ("How many legs does a spider have?", "Eight"),
]


@pl.function
def few_shot_qa(s, question):
    s += "Answer each question in a few words, like the examples.\n\n"
    for q, a in EXAMPLES:
        s += f"Question: {q}\nAnswer: {a}\n\n"
    s += "Question: " + question + "\nAnswer:"
    s += pl.gen("answer", stop="\n")


@pl.function
def tree_of_thought(s, question):
    s += "Think step by step, then answer.\n"
    for q, a in EXAMPLES:
        s += f"Question: {q}\nThought: recall the fact.\nAnswer: {a}\n\n"
    s += "Question: " + question + "\n"
    thoughts = s.fork(3)
    thoughts += lambda i: f"Thought {i + 1}:" + pl.gen("thought", stop="\n")
    for t in thoughts:
        leaves = t.fork(2)
        leaves += lambda j: f"\nAnswer {j + 1}:" + pl.gen("answer", stop="\n")
        leaves.join()
    thoughts.join()
    s += "Best thought:" + pl.select("best", [" 1", " 2", " 3"])


def questions(n: int) -> list[dict[str, str]]:
    things = ["moon", "ocean", "desert", "forest", "river", "volcano", "glacier", "island"]
    asks = [
        "What is a {} made of?",
        "Where can you find a {}?",
        "Why is a {} important?",
        "How old is the oldest {}?",
        "What lives near a {}?",
        "How big is a {}?",
        "What colour is a {}?",
        "Who studies the {}?",
    ]
    return [
        {"question": asks[i % len(asks)].format(things[i // len(asks) % len(things)])}
        for i in range(n)
    ]


def run_workload(
    runtime: pl.Runtime, program: Any, batch: list[dict], max_tokens: int
) -> dict[str, float]:
    runtime.flush_cache()
    runtime.reset_stats()
    start = time.perf_counter()
    states = program.run_batch(batch, backend=runtime, temperature=0, max_new_tokens=max_tokens)
    elapsed = time.perf_counter() - start
    errors = [s.error() for s in states if s.error() is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} programs failed, first: {errors[0]!r}")
    stats = runtime.reset_stats()
    return {
        "seconds": elapsed,
        "programs_per_s": len(batch) / elapsed,
        "prompt_tokens": stats.prompt_tokens,
        "computed": stats.computed_prompt_tokens,
        "output_tok_per_s": stats.completion_tokens / elapsed,
    }


def bench_engines(model_path: str | None, n: int, tot_n: int, max_tokens: int) -> list[tuple]:
    rows = []
    results: dict[tuple[str, bool], dict[str, float]] = {}
    for radix in (False, True):
        runtime = pl.Runtime(model_path=model_path, disable_radix_cache=not radix, random_seed=0)
        try:
            few_shot_qa.run(question="warm up", backend=runtime, max_new_tokens=2)
            results[("few-shot QA", radix)] = run_workload(
                runtime, few_shot_qa, questions(n), max_tokens
            )
            results[("tree of thought", radix)] = run_workload(
                runtime, tree_of_thought, questions(tot_n), max_tokens
            )
        finally:
            runtime.shutdown()
    for name, count in (("few-shot QA", n), ("tree of thought", tot_n)):
        base, ours = results[(name, False)], results[(name, True)]
        rows.append((f"{name} x{count}", base, ours))
    return rows


class NullBackend:
    """Answers instantly, so timings below are the interpreter's own cost."""

    chat_template = chatml()

    def generate(self, s: Any, params: Any) -> tuple[str, dict]:
        return "x", {}

    def select(self, s: Any, choices: list[str], temperature: float, method: Any):
        return ChoicesDecision(choices[0], {})

    def cache_prefix(self, text: str) -> None:
        pass


def bench_overhead(reps: int = 2000) -> list[tuple[str, float]]:
    backend = NullBackend()

    def per_op(body: Any, ops: int) -> float:
        prog = pl.function(body)
        prog.run(backend=backend)  # warm
        start = time.perf_counter()
        state = prog.run(backend=backend)
        state.text()
        return (time.perf_counter() - start) / ops * 1e6

    def texts(s):
        for _ in range(reps):
            s += "word "

    def gens(s):
        for _ in range(reps):
            s += pl.gen("g", max_tokens=1)

    def gens_read(s):
        for _ in range(reps // 4):
            s += pl.gen("g", max_tokens=1)
            s["g"]

    def selects(s):
        for _ in range(reps):
            s += pl.select("c", ["a", "b"])

    def chat4(s):  # a 4-message chat: role markers depend on the (short) history
        s += pl.user("hi")
        s += pl.assistant("ok")
        s += pl.user("again")
        s += pl.assistant("sure")

    def forks(s):
        for _ in range(reps // 20):
            f = s.fork(4)
            f += pl.gen("g", max_tokens=1)
            f.join()

    def empty(s):
        pass

    def per_run(body: Any, runs: int = 200) -> float:
        prog = pl.function(body)
        start = time.perf_counter()
        for _ in range(runs):
            prog.run(backend=backend).text()
        return (time.perf_counter() - start) / runs * 1e6

    run_cost = per_run(empty)
    role_cost = (per_run(chat4) - run_cost) / 4
    return [
        ("s += text", per_op(texts, reps)),
        ("s += gen", per_op(gens, reps)),
        ("gen + read s[var]", per_op(gens_read, reps // 4)),
        ("s += select", per_op(selects, reps)),
        ("role message (in a 4-message chat)", role_cost),
        ("fork(4) + gen + join", per_op(forks, reps // 20)),
        ("run() of an empty program", run_cost),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--tot-questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--skip-engine", action="store_true", help="only interpreter overhead")
    args = ap.parse_args()

    if not args.skip_engine:
        rows = bench_engines(args.model_path, args.questions, args.tot_questions, args.max_tokens)
        print(
            f"\nworkload (max_tokens={args.max_tokens})    | cache | seconds | programs/s |"
            f" out tok/s | prompt tok | computed prefill | speedup"
        )
        print("-" * 110)
        for name, base, ours in rows:
            for label, r in (("off", base), ("on", ours)):
                ratio = base["seconds"] / r["seconds"]
                print(
                    f"{name:<33} | {label:>5} | {r['seconds']:7.2f} | "
                    f"{r['programs_per_s']:10.2f} | {r['output_tok_per_s']:9.1f} | "
                    f"{r['prompt_tokens']:10d} | {r['computed']:16d} | {ratio:6.2f}x"
                )
    print("\ninterpreter overhead (null backend)  | us per op")
    print("-" * 50)
    for name, us in bench_overhead():
        print(f"{name:<36} | {us:9.1f}")


if __name__ == "__main__":
    main()
