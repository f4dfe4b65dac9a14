"""Structured-generation benchmark: JSON-schema decoding with and without jump-forward, against
unconstrained decoding of the same prompts (the baseline), one engine, same run.

    .venv/bin/python -m benchmarks.structured [--model-path PATH] [--requests 64]
                                                 [--max-new-tokens 96]

1. Batch: all requests greedy, submitted in one ``generate`` call so they batch together.
   Columns: output tokens per second, forward passes (prefill, decode and jump-forward extend
   steps), grammar-forced tokens that skipped a decode step, model-sampled tokens per output
   token (each sampled token is one forward the request took part in), valid outputs.
2. Solo: the first ``--solo`` prompts one at a time, where latency is forward passes.
The prefix cache is flushed before each run and the grammar is compiled in a warm-up, so every
mode computes the same prompts and none pays compilation.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import plait

SCHEMA = {
    "type": "object",
    "required": ["productName", "productCategory", "priceInDollars", "isInStock", "tags"],
    "properties": {
        "productName": {"type": "string", "maxLength": 24},
        "productCategory": {"enum": ["kitchen", "garden", "electronics", "clothing", "toys"]},
        "priceInDollars": {"type": "number", "minimum": 0, "maximum": 10000},
        "isInStock": {"type": "boolean"},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 10}},
    },
}
ADJECTIVES = ["red", "wooden", "wireless", "tiny", "waterproof", "vintage", "folding", "smart"]
THINGS = ["kettle", "shovel", "headphones", "jacket", "robot", "lamp", "chair", "backpack"]


def prompts(engine: plait.Engine, n: int) -> list[str]:
    out = []
    for i in range(n):
        thing = f"{ADJECTIVES[i % len(ADJECTIVES)]} {THINGS[i // len(ADJECTIVES) % len(THINGS)]}"
        question = (
            f"Describe a {thing} for an online shop as JSON with its name, category, "
            "price, whether it is in stock and a few tags. Reply with only the JSON."
        )
        out.append(
            engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        )
    return out


def is_valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text, strict=False), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def run_mode(
    engine: plait.Engine,
    batch: list[str],
    max_new_tokens: int,
    constrained: bool,
    jump_forward: bool,
) -> dict[str, Any]:
    """One mode over ``batch``, all in one generate call."""
    engine.scheduler.config.enable_jump_forward = jump_forward
    assert engine.flush_cache()
    before = engine.get_server_info()
    sp = {"temperature": 0, "max_new_tokens": max_new_tokens}
    if constrained:
        sp["json_schema"] = SCHEMA
    start = time.perf_counter()
    outs = engine.generate(prompt=batch, sampling_params=sp)
    seconds = time.perf_counter() - start
    after = engine.get_server_info()
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    jumped = after["jump_forward_tokens"] - before["jump_forward_tokens"]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tok_per_s": tokens / seconds,
        "passes": after["forward_passes"] - before["forward_passes"],
        "jumped": jumped,
        "sampled_per_token": (tokens - jumped) / tokens,
        "valid": sum(is_valid(o["text"]) for o in outs),
        "example": outs[0]["text"],
    }


def run_solo(
    engine: plait.Engine,
    batch: list[str],
    max_new_tokens: int,
    constrained: bool,
    jump_forward: bool,
) -> dict[str, Any]:
    """The same mode, one request at a time."""
    runs = [
        run_mode(engine, [prompt], max_new_tokens, constrained, jump_forward) for prompt in batch
    ]
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    passes = sum(r["passes"] for r in runs)
    return {
        "seconds": seconds / len(runs),
        "tokens": tokens,
        "tok_per_s": tokens / seconds,
        "passes": passes,
        "passes_per_token": passes / tokens,
        "valid": sum(r["valid"] for r in runs),
    }


MODES = [
    ("unconstrained (baseline)", False, False),
    ("json_schema, no jump-forward", True, False),
    ("json_schema + jump-forward", True, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--solo", type=int, default=3, help="prompts also run one at a time")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    with plait.Engine(args.model_path, max_running_requests=max(args.requests, 1)) as engine:
        batch = prompts(engine, args.requests)
        start = time.perf_counter()
        engine.generate(
            prompt=batch[0],
            sampling_params={"json_schema": SCHEMA, "max_new_tokens": 4, "temperature": 0},
        )  # compile + warm up
        warmup = time.perf_counter() - start
        results = [
            (name, run_mode(engine, batch, args.max_new_tokens, constrained, jf))
            for name, constrained, jf in MODES
        ]
        solo = (
            [
                (name, run_solo(engine, batch[: args.solo], args.max_new_tokens, constrained, jf))
                for name, constrained, jf in MODES
            ]
            if args.solo
            else []
        )

    base = results[0][1]
    print(
        f"\nbatch: {args.requests} requests in one call, greedy, max_new_tokens="
        f"{args.max_new_tokens}, device={engine.device_name}; warm-up incl. grammar compile "
        f"{warmup:.2f}s"
    )
    print(
        f"{'mode':<30} | seconds | out tokens | tok/s | vs base | forward passes | "
        f"jumped tokens | sampled/token | valid"
    )
    print("-" * 122)
    for name, r in results:
        print(
            f"{name:<30} | {r['seconds']:7.1f} | {r['tokens']:10d} | {r['tok_per_s']:5.1f} | "
            f"{r['tok_per_s'] / base['tok_per_s']:6.2f}x | {r['passes']:14d} | "
            f"{r['jumped']:13d} | {r['sampled_per_token']:13.3f} | "
            f"{r['valid']:>2}/{args.requests}"
        )
    if solo:
        base = solo[0][1]
        print(f"\nsolo: {args.solo} requests one at a time (latency)")
        print(
            f"{'mode':<30} | s/request | out tokens | tok/s | vs base | forward passes | "
            f"passes/token | valid"
        )
        print("-" * 110)
        for name, r in solo:
            print(
                f"{name:<30} | {r['seconds']:9.2f} | {r['tokens']:10d} | "
                f"{r['tok_per_s']:5.1f} | {r['tok_per_s'] / base['tok_per_s']:6.2f}x | "
                f"{r['passes']:14d} | {r['passes_per_token']:12.3f} | "
                f"{r['valid']:>2}/{args.solo}"
            )
    print("\nfirst output per mode:")
    for name, r in results:
        print(f"  {name}: {r['example']!r}")


if __name__ == "__main__":
    main()
