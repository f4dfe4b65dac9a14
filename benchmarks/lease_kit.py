"""Issue 41's lease kit: one command for a short GPU lease (about 10 minutes on an H100/H200).

    python -m benchmarks.lease_kit --out OUT                         # on the GPU machine
    python -m benchmarks.lease_kit --out OUT --tiny --device cpu --serving-client httpx  # CI

Stages, in order, each recorded (figures, or the error that stopped it) in ``OUT/kit.json``
and ``OUT/kit.md``; one failing stage does not stop the others:

``host``      the null model's host ms per decode step at batch 1, 64, 256 on this machine
              (``benchmarks.host_path.measure``: offline, forward costs nothing).
``decode``    per model shape (SmolLM2-135M and Llama-3-8B, random weights built from their
              configs here, nothing downloaded; bf16 on a GPU): decode tok/s at batch 1, 64, 256
              with decode graphs (prefill subtracted: one new token against ``--new``).
``profile``   per shape, batch 64 decode under ``torch.profiler``: device kernel time over the
              wall time of the decode steps (the GPU's busy fraction; a one-token run, the
              prefill, subtracted from a ``--new`` one), and the decode attention kernels'
              bandwidth -- the KV bytes they must read over their time -- against the HBM limit
              of the device (``HBM_TBPS``). On a CPU there are no device kernels: both are
              recorded as not measured, with that reason.
``serving``   ``plait serve`` with the SmolLM2 shape, driven by sglang's ``bench_serving``
              (``--dataset-name random-ids``) or, with ``--serving-client httpx``, Plait's own
              streaming client (``benchmarks.serving.serving``). The server is always killed.

``--tiny`` shrinks everything (a 2-layer model, batches 1 and 4, a few tokens) so the whole kit
runs on a CPU in seconds; the figures then only prove the kit runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.lease_shapes import SHAPES, kv_bytes_per_step, make_random_model

#: peak HBM bandwidth (TB/s) by device name fragment; the attention bandwidth's limit
HBM_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100": 3.35, "A100": 2.0}
#: kernel name fragments of the decode attention (Triton's split-KV stages)
ATTENTION_KERNELS = ("decode_attn", "decode_att", "_fwd_kernel_stage", "attn_decode")


def hbm_limit(device_name: str) -> float | None:
    return next((v for k, v in HBM_TBPS.items() if k in device_name), None)


def _engine(path: Path, args: argparse.Namespace, batch: int, context: int) -> Any:
    import plait

    return plait.Engine(
        str(path),
        device=args.device,
        dtype=args.dtype,
        max_running_requests=batch,
        max_total_tokens=batch * context,
    )


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return [[100 + (7 * i + 13 * j) % (vocab - 200) for j in range(length)] for i in range(batch)]


def _run(engine: Any, prompts: list[list[int]], new: int) -> float:
    params = {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}
    engine.flush_cache()
    t0 = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=params)
    return time.perf_counter() - t0


def stage_host(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import plait
    from benchmarks import host_path
    from plait.models.default import default_model_path
    from plait.models.null import make_null_checkpoint

    path = make_null_checkpoint(work / "null", default_model_path())
    top = max(args.batches)
    engine = plait.Engine(
        str(path),
        device=args.device,
        max_running_requests=top,
        max_total_tokens=top * (32 + args.new),
    )
    try:
        host_path._serve(engine, top, 4, False)  # warm-up
        return {str(b): host_path.measure(engine, b, args.new, False) for b in args.batches}
    finally:
        engine.shutdown()


def stage_decode(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for shape in args.shapes:
        path = make_random_model(shape, work / shape, args.tiny, args.device, args.dtype)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        top = max(args.batches)
        engine = _engine(path, args, top, args.input_len + args.new + 16)
        try:
            _run(engine, _prompts(top, args.input_len, vocab), 2)  # warm-up, graphs captured
            rates = {}
            for b in args.batches:
                prompts = _prompts(b, args.input_len, vocab)
                first, full = _run(engine, prompts, 1), _run(engine, prompts, args.new)
                rates[str(b)] = b * (args.new - 1) / max(full - first, 1e-9)
            out[shape] = {"decode_tok_per_s": rates, "info": _graph_info(engine)}
        finally:
            engine.shutdown()
    return out


def _graph_info(engine: Any) -> dict[str, Any]:
    info = engine.get_server_info()
    return {k: info.get(k) for k in ("graph_capture", "device", "overlap_schedule")}


def stage_profile(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    on_gpu = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    batch = args.profile_batch
    out: dict[str, Any] = {"device_name": device_name, "hbm_limit_tbps": hbm_limit(device_name)}
    for shape in args.shapes:
        path = make_random_model(shape, work / shape, args.tiny, args.device, args.dtype)
        config = json.loads((path / "config.json").read_text())
        engine = _engine(path, args, batch, args.input_len + args.new + 16)
        prompts = _prompts(batch, args.input_len, config["vocab_size"])
        try:
            _run(engine, prompts, args.new)  # warm-up
            first = _profiled(engine, prompts, 1, on_gpu)  # prefill and one token
            full = _profiled(engine, prompts, args.new, on_gpu)
        finally:
            engine.shutdown()
        # the decode steps alone: the one-token run's kernels and wall subtracted
        names = set(full[0]) | set(first[0])
        kernels = [(k, full[0].get(k, 0.0) - first[0].get(k, 0.0)) for k in names]
        wall = full[1] - first[1]
        out[shape] = busy_and_bandwidth(
            [(k, t) for k, t in kernels if t > 0] if full[0] else [],
            wall,
            config,
            batch,
            args.input_len,
            args.new,
            args.dtype,
        )
        out[shape]["wall_s"] = wall
    return out


def _profiled(engine: Any, prompts: list[list[int]], new: int, on_gpu: bool) -> tuple[dict, float]:
    """Device seconds per kernel name, and the wall seconds, of one run under the profiler."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        wall = _run(engine, prompts, new)
        if on_gpu:
            torch.cuda.synchronize()
    kernels = {
        e.key: e.self_device_time_total / 1e6
        for e in prof.key_averages()
        if getattr(e, "self_device_time_total", 0) > 0
    }
    return kernels, wall


def busy_and_bandwidth(
    kernels: list[tuple[str, float]],
    wall: float,
    config: dict[str, Any],
    batch: int,
    input_len: int,
    new: int,
    dtype: str,
) -> dict[str, Any]:
    """The busy fraction (all device kernel seconds over ``wall``) and the decode attention
    kernels' bandwidth (KV bytes the run's decode steps read, over those kernels' seconds);
    ``None`` with a reason where no device kernel was recorded (a CPU)."""
    if not kernels:
        reason = "no device kernels recorded (a CPU run)"
        return {"busy_fraction": None, "attention_tbps": None, "not_measured": reason}
    busy = sum(t for _, t in kernels) / wall
    attn = sum(t for name, t in kernels if any(k in name for k in ATTENTION_KERNELS))
    kv = sum(kv_bytes_per_step(config, batch, input_len + s, dtype) for s in range(1, new))
    return {
        "busy_fraction": busy,
        "attention_s": attn,
        "attention_tbps": kv / attn / 1e12 if attn else None,
        "top_kernels": sorted(kernels, key=lambda k: -k[1])[:8],
    }


def stage_serving(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.serving import serving

    shape = args.shapes[0]
    path = make_random_model(shape, work / shape, args.tiny, args.device, args.dtype)
    load = argparse.Namespace(
        model_path=str(path), verbose=False, dataset="random", num_prompts=args.serve_prompts,
        input_len=args.input_len, output_len=args.new, range_ratio=0.0, prefix_len=0,
        num_groups=1, max_concurrency=args.serve_concurrency, seed=0,
        request_rate=float("inf"), warmup=True,
    )  # fmt: skip
    extra = f"--device {args.device} --dtype {args.dtype}"
    proc, url = serving.launch(extra, load)
    try:
        if args.serving_client == "httpx":
            return {"client": "httpx", "server_args": extra, **serving.bench(url, load)}
        return {"client": "sglang.bench_serving", **_bench_serving(args, url, path, work)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _bench_serving(args: argparse.Namespace, url: str, path: Path, work: Path) -> dict:
    result = work / "bench_serving.jsonl"
    cmd = [
        args.bench_serving_python, "-m", "sglang.bench_serving", "--backend", "sglang",
        "--base-url", url, "--tokenizer", str(path), "--dataset-name", "random-ids",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.new),
        "--random-range-ratio", "1", "--num-prompts", str(args.serve_prompts),
        "--max-concurrency", str(args.serve_concurrency), "--disable-tqdm",
        "--output-file", str(result),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"sglang.bench_serving exited {done.returncode}: {done.stderr[-800:]}")
    return json.loads(result.read_text().splitlines()[-1])


STAGES: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "host": stage_host,
    "decode": stage_decode,
    "profile": stage_profile,
    "serving": stage_serving,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long dry run (CI)")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--serving-client", choices=["bench_serving", "httpx"], default="bench_serving")
    ap.add_argument("--bench-serving-python", default=sys.executable)
    ap.add_argument("--stage-timeout", type=float, default=300)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    big = not args.tiny
    args.batches = [1, 64, 256] if big else [1, 4]
    args.new = 64 if big else 8
    args.input_len = 256 if big else 8
    args.profile_batch = 64 if big else 4
    args.serve_prompts, args.serve_concurrency = (512, 256) if big else (4, 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="plait-kit-") as tmp:
        for name in args.stages:
            t0 = time.perf_counter()
            try:
                entry = {"ok": True, **STAGES[name](args, Path(tmp))}
            except Exception as e:  # noqa: BLE001 - one stage's failure is recorded, not fatal
                entry = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            entry["seconds"] = time.perf_counter() - t0
            report["stages"][name] = entry
            print(f"=== {name}: {'ok' if entry['ok'] else entry['error']}", flush=True)
    (args.out / "kit.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "kit.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["ok"] for s in report["stages"].values()) else 1


def markdown(report: dict[str, Any]) -> str:
    """One table row per figure: stage, what, value."""
    rows = ["| stage | figure | value |", "|---|---|---:|"]
    for stage, entry in report["stages"].items():
        for key, value in _flatten(entry):
            if key in ("ok", "seconds") or isinstance(value, (list, dict)):
                continue
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            shown = shown.replace("\n", " ").replace("|", "/")
            rows.append(f"| {stage} | {key} | {shown} |")
    return "\n".join(rows) + "\n"


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            items.extend(_flatten(v, f"{prefix}{k}."))
        else:
            items.append((f"{prefix}{k}", v))
    return items


if __name__ == "__main__":
    sys.exit(main())
