"""The greedy LM head (``plait/backends/cpu/greedy_head.h``) against the float32 panel head
followed by ``max``, on SmolLM2-135M's real LM head and real final hidden states.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.greedy_head_cpu  # ~1 min

The hidden states are transformers' final-normed states of ``--prompts`` random-id prompts of
``--length`` tokens (every position counts as a decode row). The script checks that the two
give the same tokens on every row, prints how many candidates the bfloat16 screen leaves per
row (the tokens whose float32 logit it must recompute), then times both at batch sizes
``--batch``, alternating, median of ``--repeats``. The weights stream from memory as in a
decode step only in part: the 57 MB bfloat16 copy and the 113 MB float32 panels are read once a
call, and the L3 keeps some of them between calls.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from plait.backends.cpu import cpp_build
from plait.backends.cpu.greedy_head import extension

MODEL = os.path.expanduser("~/.cache/plait/models/SmolLM2-135M-Instruct")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--length", type=int, default=96)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    greedy = extension()
    if greedy is None:
        raise SystemExit("the greedy head needs a CPU with AVX-512 BF16 and a C++ compiler")
    panel = cpp_build.extension().panel_gemm
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    rng = random.Random(0)
    ids = torch.tensor(
        [[rng.randrange(100, 40000) for _ in range(args.length)] for _ in range(args.prompts)]
    )
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
    hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    weight = model.lm_head.weight.detach().float().contiguous()
    vocab = weight.shape[0]
    panels = panel.pack(weight)
    packed, norms = greedy.pack(panels, vocab)

    logits = panel.linear(hidden, panels, vocab, None)
    same = torch.equal(greedy.argmax(hidden, packed, norms, panels), logits.max(-1).indices)
    bound = greedy.bound_factor(hidden.shape[1]) * hidden.norm(dim=1, keepdim=True) * norms[None, :]
    # a superset of the kernel's candidates: within twice the bound of the float32 maximum
    cand = (logits + 2 * bound >= logits.max(-1, keepdim=True).values).sum(-1).float()
    print(
        f"threads: {torch.get_num_threads()}; {hidden.shape[0]} rows; same tokens as the "
        f"float32 head on every row: {same}"
    )
    print(
        f"candidates per row (at most): median {cand.median():.0f}, 90th percentile "
        f"{cand.quantile(0.9):.0f}, max {cand.max():.0f}\n"
    )
    print("| batch | float32 head + max, ms | greedy head, ms | ratio |")
    print("|---:|---:|---:|---:|")
    for b in args.batch:
        x = hidden[:b].contiguous()
        full, screened = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            panel.linear(x, panels, vocab, None).max(-1)
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            greedy.argmax(x, packed, norms, panels)
            screened.append(time.perf_counter() - t)
        a, s = statistics.median(full), statistics.median(screened)
        print(f"| {b} | {a * 1e3:.2f} | {s * 1e3:.2f} | {a / s:.2f}x |")


if __name__ == "__main__":
    main()
