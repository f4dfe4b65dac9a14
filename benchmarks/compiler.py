"""Compiler benchmark: what code movement buys programs written question-first.

    .venv/bin/python -m benchmarks.compiler [--model-path PATH] [--questions 32] [--rounds 2]

The program set is written for the pass: three few-shot programs (facts, arithmetic, sentiment)
that state the question *before* their examples, the order in which nothing but the
instruction is shared between two instances. Each program runs ``run_batch`` over the same
questions three ways, in the same process on the same engine, ABBA-alternated rounds, every
run from an empty prefix cache:

- ``interpreted``: ``program.run_batch`` (the interpreter; it prefills the traced static
  prefix, here only the instruction);
- ``compiled``: ``program.compile().run_batch``, same prompts;
- ``moved``: ``program.compile(code_movement=True).run_batch``: the examples move ahead of the
  question, so every instance shares them.

Reported per program: the prefix-cache hit rate (cached prompt tokens / prompt tokens, from
each request's ``meta_info``), programs per second, and the prompt tokens actually computed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import plait.frontend as pl
from benchmarks.harness import alternate, medians, table

FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the boiling point of water in Celsius?", "100 degrees"),
    ("How many legs does a spider have?", "Eight"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"),
]
SUMS = [(f"What is {a} plus {b}?", str(a + b)) for a, b in ((3, 4), (12, 9), (25, 17), (8, 30))]
MOODS = [
    ("The film was a delight from start to finish.", "positive"),
    ("I waited an hour and the soup was cold.", "negative"),
    ("The package arrived on Tuesday.", "neutral"),
    ("Best concert I have been to in years!", "positive"),
]


def _examples(pairs: list[tuple[str, str]], q: str, a: str) -> str:
    return "".join(f"{q}: {x}\n{a}: {y}\n\n" for x, y in pairs)


@pl.function
def facts_qa(s, question):
    s += "Answer the question in a few words.\n"
    s += "Question: " + question + "\n\n"
    s += "Here are solved examples to follow:\n" + _examples(FACTS, "Question", "Answer")
    s += "Answer:" + pl.gen("answer", stop="\n")


@pl.function
def arithmetic(s, question):
    s += "Compute the result.\nProblem: " + question + "\n\n"
    s += "Worked examples:\n" + _examples(SUMS, "Problem", "Result")
    s += "Result:" + pl.gen("answer", stop="\n")


@pl.function
def sentiment(s, question):
    s += "Classify the sentiment of the review.\nReview: " + question + "\n\n"
    s += "Labelled reviews:\n" + _examples(MOODS, "Review", "Sentiment")
    s += "Sentiment:" + pl.gen("answer", stop="\n")


PROGRAMS = {"facts QA": facts_qa, "arithmetic": arithmetic, "sentiment": sentiment}


def questions(n: int) -> list[dict[str, str]]:
    things = ["moon", "ocean", "desert", "forest", "river", "volcano", "glacier", "island"]
    asks = ["What is a {} made of?", "Where is the nearest {}?", "How old is the oldest {}?"]
    return [
        {"question": asks[i % 3].format(things[i // 3 % len(things)]) + f" ({i})"} for i in range(n)
    ]


def one_run(runtime: pl.Runtime, runner: Any, batch: list[dict], max_tokens: int) -> dict:
    runtime.flush_cache()
    runtime.reset_stats()
    start = time.perf_counter()
    states = runner.run_batch(batch, backend=runtime, temperature=0, max_new_tokens=max_tokens)
    seconds = time.perf_counter() - start
    failed = [s.error() for s in states if s.error() is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} programs failed, first: {failed[0]!r}")
    stats = runtime.reset_stats()
    return {
        "hit_rate": stats.cached_tokens / stats.prompt_tokens,
        "programs_per_s": len(batch) / seconds,
        "computed": float(stats.computed_prompt_tokens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runtime = pl.Runtime(model_path=args.model_path, random_seed=0)
    batch = questions(args.questions)
    try:
        runners = {
            name: {
                "interpreted": program,
                "compiled": program.compile(),
                "moved": program.compile(code_movement=True),
            }
            for name, program in PROGRAMS.items()
        }
        facts_qa.run(question="warm up", backend=runtime, max_new_tokens=2)
        runs: dict[tuple[str, str], list[dict]] = {}
        for name in PROGRAMS:
            for _, mode in alternate(["interpreted", "compiled", "moved"], args.rounds):
                result = one_run(runtime, runners[name][mode], batch, args.max_tokens)
                runs.setdefault((name, mode), []).append(result)
    finally:
        runtime.shutdown()
    for metric, fmt in (
        ("hit_rate", "{:.3f}"),
        ("programs_per_s", "{:.2f}"),
        ("computed", "{:.0f}"),
    ):
        rows = [
            (
                f"{name} x{args.questions}",
                {m: medians(runs[(name, m)])[metric] for m in runners[name]},
            )
            for name in PROGRAMS
        ]
        print(f"\n{metric} (median of {args.rounds} rounds, max_tokens={args.max_tokens})")
        print(table(rows, baseline="interpreted", fmt=fmt))


if __name__ == "__main__":
    main()
