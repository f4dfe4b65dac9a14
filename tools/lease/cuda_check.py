"""Checks and figures for an accelerator (CUDA by default) in one script, for short device leases.

    python -m tools.lease.cuda_check make-model \\
        --like ~/.cache/plait/models/SmolLM2-135M-Instruct --out /tmp/smol-random
    python -m tools.lease.cuda_check parity --model /tmp/smol-random --device cuda
    python -m tools.lease.cuda_check decode --model /tmp/smol-random --device cuda

``make-model`` writes a checkpoint with the architecture, config and tokenizer of ``--like`` and
seeded random weights (transformers' own initialiser). It exists because a device lease can
carry at most 64 MiB, less than the 98 MB GGUF the default model comes from; speed does not
depend on the weights' values, and parity holds on any weights.

``parity`` is the correctness oracle on the device: transformers' greedy ``generate`` in float32
(TF32 off) one prompt at a time, against Plait in float32 on the same weights, batched, with
radix-cache hits, one prompt at a time, with chunked prefill, without graphs and without the
overlap schedule. It prints, per prompt, transformers' smallest top-1/top-2 logit gap, so a
mismatch can be told apart from a near-tie.

``qmatmul`` times the Triton quantized matmul (``plait.backends.cuda.quantized_matmul``) against
torch's fp16 ``F.linear`` on the float weight, at M = 1/16/64 rows for SmolLM2's Linear shapes
(N, K) and int8 (per channel), Q4_1 and Q4_0 (groups of 32) weights; each cell is the device
time per call of a CUDA graph of ``--iters`` calls (median of 5 replays), so Python launch
overhead is excluded, as in graph-captured decode. It first checks every cell against
dequantize-then-matmul. About 30 s, most of it Triton compiling. Needs no model.

``decode`` measures output tok/s of Plait (decode graphs on and off) and of transformers'
``generate`` (static batch) at batch 1/16/64/256 with 32-token prompts, plus 64 mixed
requests and 32 requests sharing a 1,000-token prefix, all in one process. Medians of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import requests_per_s, tokens_per_s
from benchmarks.harness import seeded_requests as requests
from benchmarks.harness import serve_seconds as serve

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    (
        "You are a careful assistant. Answer briefly and precisely. Here is some context about the "
        "solar system: the Sun is a star at the centre. Question: which planet is the largest?"
    ),
    (
        "You are a careful assistant. Answer briefly and precisely. Here is some context about the "
        "solar system: the Sun is a star at the centre. Question: how many planets orbit the Sun?"
    ),
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def strict_fp32() -> None:
    """No TF32 anywhere: the oracle compares float32 to float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def make_model(like: Path, out: Path, seed: int) -> Path:
    from transformers import AutoConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(like)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (like / name).exists():
            shutil.copy(like / name, out / name)
    return out


def hf_greedy(
    model_dir: Path, device: str, prompts: list[list[int]], new: int
) -> tuple[list[list[int]], list[float]]:
    """transformers' greedy tokens per prompt (one at a time) and the smallest top-1/top-2 gap."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    outs, gaps = [], []
    with torch.no_grad():
        for ids in prompts:
            g = model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=new,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=model.config.eos_token_id,
            )
            outs.append(g.sequences[0, len(ids) :].tolist())
            top2 = torch.stack([s[0].float().topk(2).values for s in g.scores])
            gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
    del model
    return outs, gaps


def parity(model_dir: Path, device: str, new: int) -> bool:
    from transformers import AutoTokenizer

    import plait

    strict_fp32()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    want, gaps = hf_greedy(model_dir, device, prompts, new)
    greedy = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    variants = {
        "batched (graphs, overlap)": ({}, "batch"),
        "batched again (radix hits)": ({}, "batch2"),
        "one at a time, no radix cache": ({"disable_radix_cache": True}, "alone"),
        "chunked prefill 16": ({"chunked_prefill_size": 16}, "batch"),
        "no decode graphs": ({"disable_graph_capture": True}, "batch"),
        "no overlap schedule": ({"disable_overlap_schedule": True}, "batch"),
    }
    ok = True
    print(
        f"transformers fp32 on {device}: smallest top-1/top-2 logit gap per prompt: "
        + ", ".join(f"{g:.2e}" for g in gaps)
    )
    engines: dict[str, plait.Engine] = {}
    for name, (kwargs, mode) in variants.items():
        key = json.dumps(kwargs, sort_keys=True)
        if key not in engines:
            for other in engines.values():
                other.shutdown()
            engines = {
                key: plait.Engine(
                    str(model_dir), device=device, dtype="float32", kv_cache_memory_gb=2.0, **kwargs
                )
            }
        engine = engines[key]
        if mode == "alone":
            got = [
                engine.generate(input_ids=p, sampling_params=greedy)["output_ids"] for p in prompts
            ]
        else:
            got = [
                o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=greedy)
            ]
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        info = engine.get_server_info()
        hits = info.get("cached_tokens")
        print(
            f"{name:34s} {'token-identical' if not bad else 'MISMATCH prompts ' + str(bad)}"
            f"  (graph_capture={info.get('graph_capture')}, cached_tokens={hits})"
        )
        for i in bad:
            first = next(j for j, (a, b) in enumerate(zip(got[i], want[i])) if a != b)
            print(
                f"    prompt {i}: first difference at token {first}: "
                f"got {got[i][first : first + 4]}, want {want[i][first : first + 4]}"
            )
        ok = ok and not bad
    for engine in engines.values():
        engine.shutdown()
    return ok


def workloads(new: int, quick: bool) -> list[tuple[str, list, str]]:
    """``quick``: a smoke-test size (batch 1 and 4, 4 mixed and 4 shared-prefix requests)."""
    n = 4 if quick else 64
    prefix = requests(1, (1000, 1000), (0, 0), seed=99)[0][0]
    out = [
        (f"decode batch {bs}", requests(bs, (32, 32), (new, new), bs), "tok/s")
        for bs in ((1, 4) if quick else (1, 16, 64, 256))
    ]
    out.append((f"{n} mixed (32-256 in, 16-96 out)", requests(n, (32, 256), (16, 96), 5), "tok/s"))
    out.append(
        (
            f"{n // 2} x shared 1000-token prefix (16 out)",
            requests(n // 2, (32, 32), (16, 16), 7, prefix),
            "req/s",
        )
    )
    return out


def rate(reqs: list, seconds: float, unit: str) -> float:
    """The harness's rate for ``unit`` (whole-call seconds, as on the CPU)."""
    return (requests_per_s if unit == "req/s" else tokens_per_s)(reqs, seconds)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_hf(model, reqs: list, device: str) -> float | None:
    """Static batches of equal-length prompts only (no padding): ``None`` otherwise."""
    lens = {len(p) for p, _ in reqs}
    news = {m for _, m in reqs}
    if len(lens) != 1 or len(news) != 1:
        return None
    ids = torch.tensor([p for p, _ in reqs], device=device)
    new = news.pop()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync(device)
    return time.perf_counter() - t


def decode(
    model_dir: Path,
    device: str,
    dtypes: list[str],
    repeats: int,
    new: int,
    quick: bool,
    kv_gb: float,
    hf_repeats: int,
) -> None:
    from transformers import AutoModelForCausalLM

    import plait

    loads = workloads(new, quick)
    for dtype in dtypes:
        print(f"\n### {dtype}, {device}, median of {repeats} runs, {new} new tokens at batch N\n")
        columns: dict[str, dict[str, float]] = {}
        for label, kwargs in (
            ("Plait (graphs)", {}),
            ("Plait (eager)", {"disable_graph_capture": True}),
        ):
            t0 = time.perf_counter()
            engine = plait.Engine(
                str(model_dir),
                device=device,
                dtype=dtype,
                kv_cache_memory_gb=kv_gb,
                max_running_requests=256,
                **kwargs,
            )
            start = time.perf_counter() - t0
            serve(engine, requests(4, (8, 8), (4, 4), 0))  # warm-up
            columns[label] = {}
            for title, reqs, unit in loads:
                runs = [rate(reqs, serve(engine, reqs), unit) for _ in range(repeats)]
                columns[label][title] = statistics.median(runs)
                print(f"  {label:16s} {title}: {columns[label][title]:.1f} {unit}", flush=True)
            info = {k: v for k, v in engine.get_server_info().items() if "graph" in k}
            engine.shutdown()
            print(f"{label}: engine start {start:.1f} s, {info}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        model = model.to(device).eval()
        time_hf(model, requests(1, (8, 8), (4, 4), 0), device)  # warm-up
        columns["transformers"] = {}
        for title, reqs, unit in loads:
            runs = [time_hf(model, reqs, device) for _ in range(hf_repeats)]
            if runs[0] is not None:
                columns["transformers"][title] = statistics.median(
                    rate(reqs, s, unit) for s in runs
                )
                print(
                    f"  transformers     {title}: {columns['transformers'][title]:.1f} {unit}",
                    flush=True,
                )
        del model
        names = list(columns)
        print(
            "| workload | unit | "
            + " | ".join(names)
            + " | graphs / transformers | graphs / eager |"
        )
        print("|---|---|" + "---:|" * (len(names) + 2))
        for title, _, unit in loads:
            cells = [columns[n].get(title) for n in names]
            g, e, h = cells
            print(
                f"| {title} | {unit} | "
                + " | ".join("—" if c is None else f"{c:.1f}" for c in cells)
                + f" | {'—' if h is None else f'{g / h:.2f}x'} | {g / e:.2f}x |",
                flush=True,
            )


def quant(model_dir: Path, device: str, new: int, repeats: int) -> bool:
    """Weight-only quantization end to end on ``device``: greedy tokens of int8 / int4 in
    float32 against the same method on the CPU (same quantized weights; both compute
    dequantize-then-matmul in float32), then bf16 decode throughput of each method with
    graphs against unquantized bf16."""
    from transformers import AutoTokenizer

    import plait

    strict_fp32()
    prompts = [AutoTokenizer.from_pretrained(model_dir).encode(p) for p in PROMPTS]
    greedy = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    ok = True
    for method in ("int8", "int4"):
        outs = {}
        for dev in ("cpu", device):
            with plait.Engine(
                str(model_dir),
                device=dev,
                dtype="float32",
                quantization=method,
                kv_cache_memory_gb=1.0,
            ) as engine:
                outs[dev] = [
                    o["output_ids"]
                    for o in engine.generate(input_ids=prompts, sampling_params=greedy)
                ]
        bad = [i for i, (a, b) in enumerate(zip(outs[device], outs["cpu"])) if a != b]
        print(
            f"{method} float32 {device} vs cpu: "
            f"{'token-identical' if not bad else 'MISMATCH prompts ' + str(bad)}",
            flush=True,
        )
        ok = ok and not bad
    loads = [w for w in workloads(new, quick=False) if w[0].startswith("decode")]
    print(
        f"\n| bf16 decode tok/s ({device}, graphs) | " + " | ".join(t for t, _, _ in loads) + " |"
    )
    print("|---|" + "---:|" * len(loads))
    for method in ("none", "int8", "int4"):
        with plait.Engine(
            str(model_dir),
            device=device,
            dtype="bfloat16",
            quantization=method,
            kv_cache_memory_gb=4.0,
            max_running_requests=256,
        ) as engine:
            serve(engine, requests(4, (8, 8), (4, 4), 0))  # warm-up
            cells = [
                statistics.median(rate(reqs, serve(engine, reqs), unit) for _ in range(repeats))
                for _, reqs, unit in loads
            ]
        print(f"| {method} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)
    return ok


QMATMUL_SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]


def graph_time_us(fn, iters: int) -> float:
    """Device microseconds per ``fn()`` call: a CUDA graph of ``iters`` calls, median of 5."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(times)


def qmatmul(iters: int) -> None:
    import torch.nn.functional as F

    from plait.backends.cuda.quantized_matmul import choose_tiles, quantized_matmul
    from plait.quant.formats import quantize_int4, quantize_int8
    from plait.testing.kit import assert_quantized_close, weight_on

    dev = torch.device("cuda")
    print(
        f"### quantized matmul, {torch.cuda.get_device_name()}, fp16 activations, "
        f"us per call (CUDA graph of {iters})\n"
    )
    formats = {
        "int8": lambda w: quantize_int8(w, shrinks=(1.0,)),
        "q4_1": lambda w: quantize_int4(w, 32, shrinks=(1.0,)),
        "q4_0": lambda w: quantize_int4(w, 32, symmetric=True, shrinks=(1.0,)),
    }
    print(
        "| N x K | M | fp16 F.linear | "
        + " | ".join(formats)
        + " | q4_1 no split-K | "
        + " | ".join(f"fp16 / {f}" for f in formats)
        + " |"
    )
    print("|---|---:|" + "---:|" * (2 * len(formats) + 2))
    gen = torch.Generator().manual_seed(0)
    for n, k in QMATMUL_SHAPES:
        dense = torch.randn(n, k, generator=gen) / k**0.5
        weights = {f: make(dense) for f, make in formats.items()}
        on_dev = {f: weight_on(w, dev) for f, w in weights.items()}
        w16 = dense.half().to(dev)
        for m in (1, 16, 64):
            x = torch.randn(m, k, generator=gen).half()
            xd = x.to(dev)
            for f, w in weights.items():  # correctness before speed
                assert_quantized_close(quantized_matmul(xd, on_dev[f]), x, w, f"{f} {n}x{k} m{m}")
            cells = [graph_time_us(lambda xd=xd, w16=w16: F.linear(xd, w16), iters)]
            cells += [
                graph_time_us(
                    lambda f=f, xd=xd, on_dev=on_dev: quantized_matmul(xd, on_dev[f]), iters
                )
                for f in formats
            ]
            no_split = choose_tiles(m, n, k)  # no SM count given: split_k = 1
            cells.append(
                graph_time_us(
                    lambda xd=xd, w=on_dev["q4_1"], tiles=no_split: quantized_matmul(xd, w, tiles),
                    iters,
                )
            )
            ratios = [cells[0] / c for c in cells[1 : 1 + len(formats)]]
            print(
                f"| {n} x {k} | {m} | "
                + " | ".join(f"{c:.1f}" for c in cells)
                + " | "
                + " | ".join(f"{r:.2f}x" for r in ratios)
                + " |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("--like", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("parity")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--new", type=int, default=32)
    q = sub.add_parser("qmatmul")
    q.add_argument("--iters", type=int, default=50, help="calls per timed CUDA graph")
    u = sub.add_parser("quant")
    u.add_argument("--model", type=Path, required=True)
    u.add_argument("--device", default="cuda")
    u.add_argument("--new", type=int, default=32)
    u.add_argument("--repeats", type=int, default=2)
    d = sub.add_parser("decode")
    d.add_argument("--model", type=Path, required=True)
    d.add_argument("--device", default="cuda")
    d.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--new", type=int, default=128)
    d.add_argument("--quick", action="store_true", help="smoke-test sizes")
    d.add_argument(
        "--hf-repeats",
        type=int,
        default=1,
        help="runs per transformers cell (its eager decode is slow)",
    )
    d.add_argument("--kv-gb", type=float, default=8.0, help="KV pool budget per engine")
    args = ap.parse_args()
    if args.cmd == "make-model":
        print(make_model(args.like.expanduser(), args.out, args.seed))
    elif args.cmd == "qmatmul":
        qmatmul(args.iters)
    elif args.cmd == "quant":
        raise SystemExit(0 if quant(args.model, args.device, args.new, args.repeats) else 1)
    elif args.cmd == "parity":
        raise SystemExit(0 if parity(args.model, args.device, args.new) else 1)
    else:
        decode(
            args.model,
            args.device,
            args.dtypes,
            args.repeats,
            args.new,
            args.quick,
            args.kv_gb,
            args.hf_repeats,
        )


if __name__ == "__main__":
    main()
