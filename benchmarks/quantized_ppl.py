"""Perplexity of int8 / int4 weight-only quantization against float32 on the fixed text of
``tests/quant/test_quantized_models.py`` (issue 17: int8 within 1 %, int4 within 5 %).

Every scheme runs through the real path (QuantizedLinear + the backend's kernel): one engine
is loaded with ``--quantization int8`` and each scheme's weights are swapped into its
quantized layers from the float32 checkpoint (the radix cache is flushed between schemes).
The defaults are also loaded the ordinary way, and must give the same perplexity as their
swapped row. ``rtn`` is round-to-nearest on the absmax (symmetric) or min-max (asymmetric)
grid (clipping factor 1.0 only, kept or refitted by least squares, whichever has less weight
error); ``search`` is :func:`plait.quant.formats.fit_scales`' full clipping search.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.quantized_ppl   # 2-7 min
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import plait
from plait.models.default import default_model_path
from plait.models.loader import load_config, load_model
from plait.quant.formats import QuantizedWeight, quantize_int4, quantize_int8
from plait.quant.modules import QuantizedLinear, int4_group_for
from tests.quant.test_quantized_models import TEXT

RTN = (1.0,)
Quantizer = Callable[[torch.Tensor], QuantizedWeight]


def int4(group: int, symmetric: bool, shrinks=None) -> Quantizer:
    kw = {} if shrinks is None else {"shrinks": shrinks}
    return lambda w: quantize_int4(w, int4_group_for(w.shape[1], group), symmetric, **kw)


DEFAULT_INT4 = (32, False, "search")
SCHEMES: dict[str, Quantizer] = {
    "int8 per-channel, rtn": lambda w: quantize_int8(w, RTN),
    "int8 per-channel, search (default)": quantize_int8,
}
for g in (32, 64, 128):
    for sym in (False, True):
        for how in ("rtn", "search"):
            label = f"int4 g{g} {'sym' if sym else 'asym'}, {how}"
            label += " (default)" if (g, sym, how) == DEFAULT_INT4 else ""
            SCHEMES[label] = int4(g, sym, RTN if how == "rtn" else None)


def perplexity(engine: plait.Engine, ids: list[int]) -> float:
    engine.flush_cache()  # a cached prefix would keep the previous weights' KV
    out = engine.generate(
        input_ids=ids,
        return_logprob=True,
        logprob_start_len=0,
        sampling_params={"max_new_tokens": 0},
    )
    lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"] if lp is not None]
    return math.exp(-sum(lps) / len(lps))


def main() -> None:
    path = default_model_path()
    engines = {
        q: plait.Engine(model_path=str(path), max_total_tokens=4096, quantization=q)
        for q in ("none", "int8", "int4")
    }
    ids = engines["none"].tokenizer.encode(TEXT)
    loaded = {q: perplexity(e, ids) for q, e in engines.items()}
    base = loaded["none"]
    floats = {
        n: m.weight.detach().contiguous()
        for n, m in load_model(
            path, load_config(path), torch.float32, torch.device("cpu"), 4096
        ).named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    engine = engines["int8"]
    layers = {
        n: m
        for n, m in engine.scheduler.runner.model.named_modules()
        if isinstance(m, QuantizedLinear)
    }
    print(
        f"{len(ids)} tokens; quantized: {len(layers)} Linear layers; float32: embedding, "
        f"LM head, norms"
    )
    print("| weights | perplexity | vs fp32 |\n|---|---|---|")
    print(f"| fp32 | {base:.3f} | |")
    for name, quantize in SCHEMES.items():
        for n, m in layers.items():
            m.qweight = quantize(floats[n])
        ppl = perplexity(engine, ids)
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % |", flush=True)
    print(f"loaded as --quantization int8: {loaded['int8']:.3f}, int4: {loaded['int4']:.3f}")
    for e in engines.values():
        e.shutdown()


if __name__ == "__main__":
    main()
