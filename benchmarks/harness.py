"""What every benchmark shares: seeded workloads, one definition of each rate, the alternating
order of rounds, medians, and the table of ratios against a baseline measured in the same run.

Rates (each says exactly what its seconds are):

- ``tokens_per_s``: generated tokens / wall seconds of ONE ``generate`` call that submits all
  of a workload's requests at once, from an empty prefix cache (``serve_seconds``). Prefill is
  included. EOS is ignored, so every request generates exactly its ``max_new_tokens``.
- ``requests_per_s``: requests / the same wall seconds.
- ``decode_rate``: decode tokens per second with prefill subtracted out: the workload is
  served twice, once with each request's own new-token count (``full``) and once with one new
  token each (``first``: prefill plus the first token); the rate is
  ``(generated tokens - requests) / (full - first)``.

A workload's ``rate(seconds)`` is ``tokens_per_s`` or ``requests_per_s`` by its ``unit``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

Request = tuple[list[int], int]  # (prompt token ids, new tokens to generate)
T = TypeVar("T")
# The engine's cumulative per-step counters (``get_server_info``; /metrics exports the same).
PHASES = ("schedule", "forward", "sample", "process", "wait")


class Generator(Protocol):
    """What a timed engine offers: ``plait.Engine`` does, and so can an adapter of a peer."""

    def generate(self, *, input_ids: list[list[int]], sampling_params: list[dict]) -> Any: ...

    def flush_cache(self) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class Workload:
    name: str  # the key in JSON files and on the command line
    title: str  # the table's row label
    unit: str  # "tok/s" (generated tokens) or "req/s"
    requests: list[Request]

    def rate(self, seconds: float) -> float:
        """This workload's rate for a whole-call time (see the module docstring)."""
        if self.unit == "req/s":
            return requests_per_s(self.requests, seconds)
        return tokens_per_s(self.requests, seconds)


def tokens_per_s(requests: Sequence[Request], seconds: float) -> float:
    return sum(n for _, n in requests) / seconds


def requests_per_s(requests: Sequence[Request], seconds: float) -> float:
    return len(requests) / seconds


def random_requests(
    rng: random.Random,
    n: int,
    prompt: tuple[int, int],
    new: tuple[int, int],
    prefix: list[int] | None = None,
) -> list[Request]:
    """``n`` requests with prompt lengths and new-token counts drawn uniformly from the
    inclusive ranges; ids from [100, 40000), clear of the tokenizer's special tokens."""
    return [
        (
            (prefix or []) + [rng.randrange(100, 40000) for _ in range(rng.randint(*prompt))],
            rng.randint(*new),
        )
        for _ in range(n)
    ]


def seeded_requests(
    n: int,
    prompt: tuple[int, int],
    new: tuple[int, int],
    seed: int,
    prefix: list[int] | None = None,
) -> list[Request]:
    """``random_requests`` from a generator of its own: the same ids for the same seed."""
    return random_requests(random.Random(seed), n, prompt, new, prefix)


def make_workloads(
    quick: bool = False,
    seed: int = 0,
    new: int | None = None,
    batches: Sequence[int] | None = None,
    prompt_len: int = 32,
) -> list[Workload]:
    """The five workloads, a pure function of the arguments: every engine gets these ids.

    ``batch{B}``: B prompts of ``prompt_len`` tokens, ``new`` tokens each (64; quick 8);
    ``mixed``: 64 requests of 32-256 prompt and 16-96 new tokens; ``shared_prefix``: 32
    requests sharing a 1,000-token prefix (32-token suffixes, 16 new tokens; req/s).
    ``quick`` shrinks them."""
    rng = random.Random(seed)
    new = new or (8 if quick else 64)
    batches = batches or ((1, 4, 8) if quick else (1, 16, 64))
    out = [
        Workload(
            name=f"batch{b}",
            title=f"batch {b}, {prompt_len} in / {new} new tokens each (tok/s)",
            unit="tok/s",
            requests=random_requests(rng, b, (prompt_len, prompt_len), (new, new)),
        )
        for b in batches
    ]
    n_mixed, prompt, mixed_new = (8, (32, 64), (4, 12)) if quick else (64, (32, 256), (16, 96))
    out.append(
        Workload(
            name="mixed",
            title=f"{n_mixed} mixed requests, {prompt[0]}-{prompt[1]} "
            f"prompt / {mixed_new[0]}-{mixed_new[1]} new tokens (tok/s)",
            unit="tok/s",
            requests=random_requests(rng, n_mixed, prompt, mixed_new),
        )
    )
    n_shared, prefix_len, shared_new = (4, 128, 4) if quick else (32, 1000, 16)
    prefix = random_requests(rng, 1, (prefix_len, prefix_len), (0, 0))[0][0]
    out.append(
        Workload(
            name="shared_prefix",
            title=f"{n_shared} requests sharing a "
            f"{prefix_len:,}-token prefix, {shared_new} new tokens (req/s)",
            unit="req/s",
            requests=random_requests(rng, n_shared, (32, 32), (shared_new, shared_new), prefix),
        )
    )
    return out


def greedy(requests: Sequence[Request], cap: int | None = None) -> list[dict]:
    """Greedy sampling parameters, EOS ignored; ``cap`` limits each request's new tokens."""
    return [
        {"max_new_tokens": n if cap is None else min(n, cap), "temperature": 0, "ignore_eos": True}
        for _, n in requests
    ]


def serve_seconds(engine: Generator, requests: Sequence[Request], cap: int | None = None) -> float:
    """Wall seconds of one ``generate`` call submitting all ``requests`` at once, from an
    empty prefix cache (the flush is not timed)."""
    engine.flush_cache()
    ids = [p for p, _ in requests]
    params = greedy(requests, cap)
    start = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params=params)
    return time.perf_counter() - start


def itl_ms(engine: Any, requests: Sequence[Request]) -> tuple[float, float]:
    """Inter-token latency, p50 and p99 in ms, of one streamed ``generate`` call submitting
    all ``requests`` at once (empty prefix cache): for each request, the wall time between
    consecutive outputs the caller receives, split evenly over the tokens the later one adds
    (the first token's wait is TTFT, not counted). Streaming makes every request emit each
    step, so this call is slower than ``serve_seconds``' and is timed apart from it."""
    engine.flush_cache()
    last: dict[str, tuple[float, int]] = {}
    gaps: list[float] = []
    outs = engine.generate(
        input_ids=[p for p, _ in requests], sampling_params=greedy(requests), stream=True
    )
    for out in outs:
        now, rid, n = time.perf_counter(), out["meta_info"]["id"], len(out["output_ids"])
        t, m = last.get(rid, (now, 0))
        if m and n > m:
            gaps += [1000 * (now - t) / (n - m)] * (n - m)
        if n > m:
            last[rid] = (now, n)
    if not gaps:
        return 0.0, 0.0
    q = statistics.quantiles(gaps, n=100, method="inclusive")
    return statistics.median(gaps), q[98]


def decode_rate(engine: Generator, workload: Workload) -> float:
    """Decode tokens/s, prefill subtracted: see the module docstring."""
    first = serve_seconds(engine, workload.requests, cap=1)
    full = serve_seconds(engine, workload.requests)
    decoded = sum(n - 1 for _, n in workload.requests)
    return decoded / (full - first)


def alternate(configs: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """(round, config) in ABBA order: forward in even rounds, backward in odd ones, so drift
    on a shared machine (a neighbour's load, a warming host) hits every config alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    for r in range(rounds):
        for config in configs if r % 2 == 0 else list(configs)[::-1]:
            yield r, config


def medians(runs: Sequence[dict]) -> dict:
    """Each numeric key's median over ``runs``; a text key (an error message) keeps the first
    non-empty value."""
    out: dict = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if isinstance(values[0], str):
            out[key] = next((v for v in values if v), "")
        else:
            out[key] = statistics.median(values)
    return out


def step_totals(info: dict) -> dict[str, float]:
    """The cumulative phase seconds, forward passes and generated tokens of a
    ``get_server_info`` reading (0 where a counter is absent)."""
    keys = [f"{p}_seconds" for p in PHASES] + ["forward_passes", "generated_tokens"]
    return {k: float(info.get(k, 0.0)) for k in keys}


def phase_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Milliseconds per forward pass in each phase, and generated tokens per pass, between
    two ``step_totals`` readings."""
    passes = after["forward_passes"] - before["forward_passes"]
    per = max(1.0, passes)  # no pass: every difference is 0
    split = {
        f"{p}_ms": 1000 * (after[f"{p}_seconds"] - before[f"{p}_seconds"]) / per for p in PHASES
    }
    split["passes"] = passes
    split["tokens_per_pass"] = (after["generated_tokens"] - before["generated_tokens"]) / per
    return split


def table(rows: Sequence[tuple[str, dict[str, float]]], baseline: str, fmt: str = "{:.1f}") -> str:
    """Markdown: a row per ``(label, {config: value})``, a column per config (the order of
    the first row), then ``config / baseline`` for every other config. A value missing from a
    row shows as a dash, and so does its ratio."""
    names = list(rows[0][1]) if rows else [baseline]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the columns {names}")
    others = [n for n in names if n != baseline]
    head = names + [f"{n} / {baseline}" for n in others]
    lines = ["| workload | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, values in rows:
        cells = ["—" if values.get(n) is None else fmt.format(values[n]) for n in names]
        base = values.get(baseline)
        cells += [
            "—" if base is None or values.get(n) is None else f"{values[n] / base:.2f}x"
            for n in others
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
