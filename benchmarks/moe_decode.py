"""A tiny MoE's decode against the same model's dense-equivalent compute, by batch size.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.moe_decode            # ~1-2 min

Two random checkpoints with the same attention, embedding and head (hidden 256, 4 layers):
a Mixtral with ``--experts`` experts of ``--moe-inter`` columns, top-``--top-k``, and a Llama
whose MLP has ``top_k * moe_inter`` columns: the FLOPs a token spends in the MoE's experts.
For each batch size the engine's decode rate (``benchmarks.harness.decode_rate``: prefill
subtracted, EOS ignored, one ``generate`` call per round, median of ``--rounds``, ABBA order)
is printed as microseconds per decoded token.

Then the MoE layer alone (router + experts) on ``T`` tokens: the fused op
(``plait.ops.fused_moe.fused_experts``: one grouped product per expert with tokens), the
dense-equivalent MLP, and a per-token loop (each token's ``k`` experts one by one, what the
fused op avoids), microseconds per token, median of ``--iters`` calls. A per-token loop's cost
per token stays flat at its worst; the fused op's falls as the batch fills each expert's
product, like the dense MLP's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import harness

HIDDEN, LAYERS, HEADS = 256, 4, 4


def write_checkpoints(root: Path, experts: int, top_k: int, moe_inter: int) -> dict[str, Path]:
    """The MoE and its dense equivalent, random weights, SmolLM2's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from plait.models.default import default_model_path

    base = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    configs = {
        "moe": AutoConfig.for_model(
            "mixtral",
            intermediate_size=moe_inter,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            **base,
        ),
        "dense": AutoConfig.for_model("llama", intermediate_size=top_k * moe_inter, **base),
    }
    paths = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
        path = root / name
        model.save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default_model_path() / f, path / f)
        paths[name] = path
    return paths


def engine_rates(paths: dict[str, Path], batches: list[int], new: int, rounds: int) -> dict:
    """``{(name, batch): microseconds per decoded token}``."""
    import plait

    engines = {n: plait.Engine(str(p), max_total_tokens=16384) for n, p in paths.items()}
    try:
        works = {
            b: harness.Workload(
                name=f"batch{b}",
                title=f"batch {b}",
                unit="tok/s",
                requests=harness.random_requests(random.Random(b), b, (16, 16), (new, new)),
            )
            for b in batches
        }
        runs: dict[tuple[str, int], list[float]] = {}
        for _, name in harness.alternate(list(engines), rounds):
            for b, w in works.items():
                rate = harness.decode_rate(engines[name], w)
                runs.setdefault((name, b), []).append(1e6 / rate)
        return {key: statistics.median(v) for key, v in runs.items()}
    finally:
        for e in engines.values():
            e.shutdown()


def median_us(fn: Callable[[], object], iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def layer_times(experts: int, top_k: int, moe_inter: int, sizes: list[int], iters: int) -> dict:
    """``{(path, T): microseconds per token}`` for the MoE layer's three forms."""
    from plait.models.moe import GatedMLP, SparseMoeBlock, softmax_topk

    torch.manual_seed(0)
    block = SparseMoeBlock(
        hidden_size=HIDDEN,
        num_experts=experts,
        top_k=top_k,
        intermediate_size=moe_inter,
        renormalize=True,
    )
    dense = GatedMLP(HIDDEN, top_k * moe_inter)
    with torch.no_grad():
        for p in (*block.parameters(), *dense.parameters()):
            p.normal_(0, 0.05)
    wgu, wd = block.experts.w_gate_up, block.experts.w_down

    def per_token(x: torch.Tensor) -> torch.Tensor:
        weights, ids = softmax_topk(block.gate(x), top_k, True)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(top_k):
                e = int(ids[t, j])
                gate, up = (wgu[e] @ x[t]).split(moe_inter)
                out[t] += weights[t, j] * (wd[e] @ (torch.nn.functional.silu(gate) * up))
        return out

    out = {}
    with torch.inference_mode():
        for t in sizes:
            x = torch.randn(t, HIDDEN)
            for name, fn in (("fused", block), ("dense", dense), ("per-token", per_token)):
                out[(name, t)] = median_us(lambda: fn(x), iters) / t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-inter", type=int, default=512)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layer-sizes", default="1,8,32,128")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--skip-engine", action="store_true", help="time the layer only")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    shape = f"{args.experts} experts x {args.moe_inter}, top-{args.top_k}"
    if not args.skip_engine:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_checkpoints(Path(tmp), args.experts, args.top_k, args.moe_inter)
            rates = engine_rates(paths, batches, args.new_tokens, args.rounds)
        print(f"engine decode, us per token ({shape} vs dense {args.top_k * args.moe_inter}):")
        print("batch  " + "  ".join(f"{n:>8}" for n in ("moe", "dense", "moe/dense")))
        for b in batches:
            m, d = rates[("moe", b)], rates[("dense", b)]
            print(f"{b:>5}  {m:8.0f}  {d:8.0f}  {m / d:9.2f}")
    sizes = [int(s) for s in args.layer_sizes.split(",")]
    times = layer_times(args.experts, args.top_k, args.moe_inter, sizes, args.iters)
    print(f"MoE layer alone, us per token ({shape}, hidden {HIDDEN}):")
    print("    T  " + "  ".join(f"{n:>9}" for n in ("fused", "dense", "per-token")))
    for t in sizes:
        row = [times[(n, t)] for n in ("fused", "dense", "per-token")]
        print(f"{t:>5}  " + "  ".join(f"{v:9.1f}" for v in row))


if __name__ == "__main__":
    main()
