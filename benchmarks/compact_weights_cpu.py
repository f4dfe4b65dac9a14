"""The layer products of one SmolLM2-135M decode step from the float32 panels against their
lossless 4-bit form (``panel_gemm.encode_affine4`` / ``linear_affine4``), weights streamed from
memory.

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compact_weights_cpu.py  # ~1 min

The weights are the default model's own (``plait.models.default``: converted from the Q4_1
GGUF, so every layer weight has the form): 30 layers of qkv, o, gate/up and down, fused as the
engine fuses them, ~405 MiB of float32 panels. Each pass multiplies all of them in model order
for M rows; the two forms alternate pass by pass, a cell is the median of ``--repeats``
passes. Every product is checked to give the panels' result bit for bit before timing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from safetensors.torch import load_file

from plait.backends.cpu.linear import panel_extension
from plait.models.default import default_model_path


def layer_weights(model_dir) -> list[torch.Tensor]:
    sd = load_file(str(model_dir / "model.safetensors"))
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    out = []
    for i in range(layers):
        def w(name: str) -> torch.Tensor:
            return sd[f"model.layers.{i}.{name}.weight"]
        out += [torch.cat([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")]),
                w("self_attn.o_proj"), torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")]),
                w("mlp.down_proj")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    panel = panel_extension()
    if panel is None:
        raise SystemExit("the panel kernel needs a CPU with AVX-512 (VNNI level) and a compiler")
    weights = []
    for w in layer_weights(default_model_path()):
        packed = panel.pack(w)
        form = panel.encode_affine4(packed)
        if not form:
            raise SystemExit("a layer weight has no 4-bit form: not the Q4_1-converted model")
        weights.append((w.shape[0], packed, form))
    full = sum(p.numel() * 4 for _, p, _ in weights)
    small = sum(t.numel() * t.element_size() for _, _, f in weights for t in f)
    print(f"threads: {torch.get_num_threads()}; {full / 2**20:.0f} MiB of float32 panels, "
          f"{small / 2**20:.0f} MiB in the 4-bit form\n")
    print("| M | float32 panels ms/step | 4-bit form ms/step | panels / 4-bit | "
          "panels GB/s of weights |")
    print("|---|---:|---:|---:|---:|")
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        for n, packed, form in weights:
            x = xs[packed.shape[1]]
            assert torch.equal(panel.linear(x, packed, n), panel.linear_affine4(x, *form, n))
        passes = {
            "panels": lambda: [panel.linear(xs[p.shape[1]], p, n) for n, p, _ in weights],
            "4-bit": lambda: [panel.linear_affine4(xs[p.shape[1]], *f, n)
                              for n, p, f in weights]}
        times: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(args.repeats):
            for name, run in passes.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        a, b = statistics.median(times["panels"]), statistics.median(times["4-bit"])
        print(f"| {m} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f}x | {full / a / 1e9:.0f} |")


if __name__ == "__main__":
    main()
