"""The layer products of one SmolLM2-135M decode step from the float32 panels against a
lossless smaller form, weights streamed from memory: the 4-bit form
(``panel_gemm.encode_affine4`` / ``linear_affine4``) or, with ``--form 16bit``, the 16-bit
form (``encode_bf16`` / ``linear_bf16``).

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.compact_weights_cpu  # ~1 min
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.kernels.compact_weights_cpu --form 16bit

The weights are the default model's own (``plait.models.default``: converted from the Q4_1
GGUF, so every layer weight has the 4-bit form); for ``16bit`` they are first rounded to
bfloat16, as a checkpoint upcast from bfloat16 holds them. 30 layers of qkv, o, gate/up and
down, fused as the engine fuses them, ~405 MiB of float32 panels. Each pass multiplies all of
them in model order for M rows; the two forms alternate pass by pass, a cell is the median of
``--repeats`` passes. Every product is checked to give the panels' result bit for bit before
timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from safetensors.torch import load_file

from plait.backends.cpu.linear import panel_extension
from plait.models.default import default_model_path


def layer_weights(model_dir, bf16: bool) -> list[torch.Tensor]:
    sd = load_file(str(model_dir / "model.safetensors"))
    if bf16:
        sd = {k: v.bfloat16().float() for k, v in sd.items()}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    out = []
    for i in range(layers):

        def w(name: str, i: int = i) -> torch.Tensor:
            return sd[f"model.layers.{i}.{name}.weight"]

        out += [
            torch.cat([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")]),
            w("self_attn.o_proj"),
            torch.cat([w("mlp.gate_proj"), w("mlp.up_proj")]),
            w("mlp.down_proj"),
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--form", choices=("4bit", "16bit"), default="4bit")
    args = ap.parse_args()
    bf16 = args.form == "16bit"
    panel = panel_extension()
    if panel is None:
        raise SystemExit("the panel kernel needs a CPU with AVX-512 (VNNI level) and a compiler")
    weights = []
    encode = panel.encode_bf16 if bf16 else panel.encode_affine4
    small_linear = panel.linear_bf16 if bf16 else panel.linear_affine4
    for w in layer_weights(default_model_path(), bf16):
        packed = panel.pack(w)
        form = encode(packed)
        if not form:
            raise SystemExit(
                f"a layer weight has no {args.form} form: not the Q4_1-converted model"
            )
        weights.append((w.shape[0], packed, form))
    full = sum(p.numel() * 4 for _, p, _ in weights)
    small = sum(t.numel() * t.element_size() for _, _, f in weights for t in f)
    print(
        f"threads: {torch.get_num_threads()}; {full / 2**20:.0f} MiB of float32 panels, "
        f"{small / 2**20:.0f} MiB in the {args.form} form\n"
    )
    print(
        f"| M | float32 panels ms/step | {args.form} form ms/step | panels / {args.form} | "
        "panels GB/s of weights |"
    )
    print("|---|---:|---:|---:|---:|")
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        for n, packed, form in weights:
            x = xs[packed.shape[1]]
            assert torch.equal(panel.linear(x, packed, n), small_linear(x, *form, n))
        passes = {
            "panels": lambda xs=xs: [panel.linear(xs[p.shape[1]], p, n) for n, p, _ in weights],
            "small": lambda xs=xs: [small_linear(xs[p.shape[1]], *f, n) for n, p, f in weights],
        }
        times: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(args.repeats):
            for name, run in passes.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        a, b = statistics.median(times["panels"]), statistics.median(times["small"])
        print(f"| {m} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f}x | {full / a / 1e9:.0f} |")


if __name__ == "__main__":
    main()
