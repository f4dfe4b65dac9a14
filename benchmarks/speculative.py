"""NGRAM speculative decoding against plain decoding, on the CPU, one run, alternating.

    .venv/bin/python -m benchmarks.speculative [--model-path PATH] [--rounds 2]
        [--max-new-tokens 96] [--quote-new-tokens 192]
        [--workloads extract1,prose1,extract16] [--json out.json]

Workloads (the default model's chat template, greedy, EOS honoured):

- ``extract1``: batch 1, extractive: repeat a given passage word for word;
- ``prose1``: batch 1, free prose: a story from a one-line prompt (nothing to copy);
- ``extract16``: batch 16, extractive: 16 passages, each quoted back.

Output lengths: prose gets ``--max-new-tokens``; a quote gets ``--quote-new-tokens``
(default :data:`QUOTE_NEW_TOKENS`), enough for the whole passage (131-150 tokens with the
default model's tokenizer; the model ends its quote with EOS), since an extractive answer is
as long as what it quotes. Cut at 64 tokens, the batch-16 run measured mostly its prefill
(16 prompts of ~185 tokens: ~6 s of one core, against ~5.5 s for 64 plain decode steps), so
a decode phase 1.3x faster showed as ~1.1x.

Three engines: ``plain`` (defaults, overlap schedule on), ``ngram`` (the defaults: verify as
a decode-shaped batch through the native decode step, ``ModelRunner.prepare_verify``, drafts
capped by the cost model of ``plait.core.spec.cost``) and ``ngram-uncapped`` (the same without
the cost model: every draft the proposer finds, as long as its own budget allows). They are
built once and served alternately (ABBA,
``harness.alternate``), from an empty prefix cache each time, so drift on a shared machine
hits every engine alike. The rate is output tokens / wall seconds of one ``generate`` call
(the engines produce the same tokens: greedy speculation is exact, and the run checks it). Also shown: tokens committed per request
and verify pass (``spec_accept_length``) and the forward passes each engine took.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import plait
from benchmarks.harness import alternate, medians, table

PARAGRAPHS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can "
    "of oil and a rag. He trimmed the wick, polished the great lens until it gleamed, and "
    "watched the beam sweep across the dark water toward the rocks.",
    "Bread rises because yeast eats the sugars in the flour and releases carbon dioxide. The "
    "gas is trapped by a web of gluten, which stretches as the dough is kneaded, so the loaf "
    "grows light and airy before it goes into a hot oven.",
    "The committee met on Tuesday to review the budget for the new library wing. After a "
    "long discussion, members agreed to fund the reading room and the children's corner, "
    "but postponed the decision on the rooftop garden until spring.",
    "Rivers carve valleys over thousands of years. Fast water carries sand and pebbles that "
    "scrape the riverbed, and floods move boulders that no ordinary current could lift, "
    "slowly cutting deeper into the rock.",
    "Maria packed her bag with a map, two apples, a flask of tea and a warm sweater. The "
    "trail to the summit was steep and rocky, and the weather in the mountains could change "
    "within an hour, so she left before sunrise.",
    "A good password is long, unique and hard to guess. Using a different password for every "
    "site means that one leak does not open all of your accounts, and a password manager can "
    "remember them so that you do not have to.",
]


#: a quote's output budget: past the longest passage (150 tokens) so the quote ends at EOS
QUOTE_NEW_TOKENS = 192


def passage(i: int) -> str:
    """Three paragraphs in an order that differs by ``i``."""
    n = len(PARAGRAPHS)
    return " ".join(PARAGRAPHS[(i + k * (1 + i % 5)) % n] for k in range(3))


def chat(engine: plait.Engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def workloads(engine: plait.Engine) -> dict[str, list[str]]:
    def extract(i: int) -> str:
        return chat(
            engine,
            f"Here is a passage:\n\n{passage(i)}\n\nRepeat the passage above word for word.",
        )

    prose = chat(engine, "Write a short story about a fox who learns to sail.")
    return {
        "extract1": [extract(0)],
        "prose1": [prose],
        "extract16": [extract(i) for i in range(16)],
    }


def serve(engine: plait.Engine, prompts: list[str], new: int) -> dict[str, Any]:
    """One generate call from an empty cache: output tokens/s, outputs, acceptance."""
    assert engine.flush_cache()
    before = engine.get_server_info()
    start = time.perf_counter()
    outs = engine.generate(
        prompt=prompts, sampling_params={"max_new_tokens": new, "temperature": 0}
    )
    seconds = time.perf_counter() - start
    after = engine.get_server_info()
    tokens = sum(len(o["output_ids"]) for o in outs)
    rows = after["spec_verify_rows"] - before["spec_verify_rows"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    return {
        "tok_s": tokens / seconds,
        "tokens": tokens,
        "passes": after["forward_passes"] - before["forward_passes"],
        "accept_length": (accepted + rows) / rows if rows else 0.0,
        "outputs": [o["output_ids"] for o in outs],
    }


def new_tokens(workload: str, args: argparse.Namespace) -> int:
    """``workload``'s output cap: a quote's whole length for the extractive ones."""
    return args.quote_new_tokens if workload.startswith("extract") else args.max_new_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96, help="free prose's output")
    ap.add_argument(
        "--quote-new-tokens",
        type=int,
        default=QUOTE_NEW_TOKENS,
        help="an extractive workload's output cap (the whole quote, ended by EOS)",
    )
    ap.add_argument(
        "--workloads", default="extract1,prose1,extract16", help="comma-separated subset"
    )
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    engines = {
        "plain": plait.Engine(args.model_path),
        "ngram": plait.Engine(args.model_path, speculative_algorithm="NGRAM"),
        "ngram-uncapped": plait.Engine(args.model_path, speculative_algorithm="NGRAM"),
    }
    engines["ngram-uncapped"].scheduler.output.observe_pass = None  # no times: no cap
    try:
        wl = workloads(engines["plain"])
        wl = {k: v for k, v in wl.items() if k in args.workloads.split(",")}
        loads: Any = None
        runs: dict[tuple[str, str], list[dict]] = {}
        for name, prompts in wl.items():
            for engine in engines.values():  # warm-up: first-call costs
                serve(engine, prompts, 8)
            new = new_tokens(name, args)
            for _, config in alternate(list(engines), args.rounds):
                runs.setdefault((name, config), []).append(serve(engines[config], prompts, new))
        loads = os.getloadavg()
    finally:
        for e in engines.values():
            e.shutdown()
    report(wl, runs, loads, args)


def report(wl: dict, runs: dict, loads: Any, args: argparse.Namespace) -> None:
    rows, extra, out = [], [], {}
    configs = sorted({c for _, c in runs}, key=["plain", "ngram", "ngram-uncapped"].index)
    for name in wl:
        every = [r for c in configs for r in runs[(name, c)]]
        same = all(r["outputs"] == every[0]["outputs"] for r in every)
        m = {
            c: medians([{k: v for k, v in r.items() if k != "outputs"} for r in runs[(name, c)]])
            for c in configs
        }
        rows.append((name, {c: m[c]["tok_s"] for c in m}))
        passes = ", ".join(f"{c} {m[c]['passes']:.0f}" for c in configs)
        accept = ", ".join(f"{c} {m[c]['accept_length']:.2f}" for c in configs[1:])
        extra.append(
            f"{name}: {m['plain']['tokens']:.0f} tokens (cap {new_tokens(name, args)}); passes {passes}; accept length "
            f"{accept}; identical outputs: {same}"
        )
        out[name] = {**{f"{c}_{k}": v for c in m for k, v in m[c].items()}, "identical": same}
    print(table(rows, "plain"))
    print("\n".join(extra))
    print(f"load average at the end (1, 5, 15 min): {loads}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workloads": out, "loadavg": list(loads)}, f, indent=1)


if __name__ == "__main__":
    main()
