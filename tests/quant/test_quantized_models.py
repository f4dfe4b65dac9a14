"""The real SmolLM2 GGUF run natively (Q4_1 layers, Q8_0 embedding/LM head) against the same
file dequantized to float32, and int8/int4 weight-only quantization against float32."""

from __future__ import annotations

import math

import pytest

import plait
from plait.models.loader import gguf_source
from plait.quant.modules import weight_bytes
from tests.core.test_engine_parity import PROMPTS

pytestmark = pytest.mark.slow

NEW = 64
GREEDY = {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}
TEXT = (
    "The history of the bicycle begins in the early nineteenth century. The first machines "
    "had no pedals: riders pushed them along with their feet. Pedals attached to the front "
    "wheel came in the 1860s, and the safety bicycle, with two wheels of equal size and a "
    "chain driving the rear wheel, appeared in the 1880s. Pneumatic tyres made it "
    "comfortable, and within a decade millions of people rode bicycles to work, to school "
    "and into the countryside. Today the bicycle is one of the most efficient ways to "
    "travel, turning almost all of the rider's effort into forward motion."
)


def make_engine(smollm_dir, **kw):
    return plait.Engine(model_path=str(smollm_dir), max_total_tokens=8192, **kw)


@pytest.fixture(scope="module")
def engines(smollm_dir):
    made = {q: make_engine(smollm_dir, quantization=q) for q in ("none", "gguf")}
    yield made
    for e in made.values():
        e.shutdown()


def perplexity(engine, ids: list[int]) -> float:
    out = engine.generate(
        input_ids=ids,
        return_logprob=True,
        logprob_start_len=0,
        sampling_params={"max_new_tokens": 0},
    )
    lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"] if lp is not None]
    return math.exp(-sum(lps) / len(lps))


def test_gguf_greedy_tokens_equal_the_dequantized_model(engines):
    """Same weights bit for bit; only the kernel's summation order differs from MKL's, so
    greedy tokens agree on >= 95 % of the parity prompts' 64-token positions (issue 17)."""
    got = engines["gguf"].generate(PROMPTS, dict(GREEDY))
    want = engines["none"].generate(PROMPTS, dict(GREEDY))
    same = total = 0
    for g, w in zip(got, want):
        g, w = g["output_ids"], w["output_ids"]
        # count positions up to the first divergence (after it the contexts differ)
        agree = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
        same, total = same + agree, total + len(w)
    assert same / total >= 0.95, f"{same}/{total} positions agree"


def test_gguf_logprobs_are_within_tolerance_of_the_dequantized_model(engines, smollm_dir):
    ids = engines["none"].tokenizer.encode(TEXT)
    lp = {}
    for q, e in engines.items():
        out = e.generate(
            input_ids=ids,
            return_logprob=True,
            logprob_start_len=0,
            sampling_params={"max_new_tokens": 0},
        )
        lp[q] = [x for x, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    worst = max(abs(a - b) for a, b in zip(lp["gguf"], lp["none"]))
    assert worst < 1e-3, worst


def test_q4_1_resident_weights_are_within_1_2x_the_file_tensor_bytes(engines, smollm_dir):
    from gguf import GGUFReader

    file_bytes = sum(int(t.n_bytes) for t in GGUFReader(str(gguf_source(smollm_dir))).tensors)
    model = engines["gguf"].scheduler.runner.model
    assert weight_bytes(model) <= 1.2 * file_bytes
    assert weight_bytes(engines["none"].scheduler.runner.model) > 4 * file_bytes  # the contrast


# Issue 17: int8 within 1 %, int4 within 5 % of float32, with the default schemes (int8
# per-channel, int4 asymmetric groups of 32, both with the clipping search). Measured: -0.16 %
# and -0.00 % (the float weights are dequantized Q4_1, whose 32-blocks int4 g32 asymmetric
# recovers exactly); groups of 128 stay at +21..58 % (docs/benchmarks.md).
@pytest.mark.parametrize("method,budget", [("int8", 0.01), ("int4", 0.05)])
def test_weight_only_quantization_keeps_perplexity(engines, smollm_dir, method, budget):
    ids = engines["none"].tokenizer.encode(TEXT)
    base = perplexity(engines["none"], ids)
    engine = make_engine(smollm_dir, quantization=method)
    try:
        ppl = perplexity(engine, ids)
    finally:
        engine.shutdown()
    assert abs(ppl / base - 1) <= budget, (method, ppl, base)


def test_int8_activations_keep_perplexity_and_logprobs_close(engines, smollm_dir):
    """``--quantization-activations int8`` (the CPU's VNNI kernel, llama.cpp's arithmetic)
    rounds every activation block to int8, so it is not token-identical to the dequantized
    model (measured: greedy prefixes agree on 209/512 parity positions) but stays close:
    measured mean |delta logprob| 0.055 (worst 0.20) and perplexity -0.9 %."""
    from plait.backends.cpu.cpp_build import has_avx512_vnni

    if not has_avx512_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    ids = engines["none"].tokenizer.encode(TEXT)
    engine = make_engine(smollm_dir, quantization="gguf", quantization_activations="int8")
    try:
        ppl = perplexity(engine, ids)
        out = engine.generate(
            input_ids=ids,
            return_logprob=True,
            logprob_start_len=0,
            sampling_params={"max_new_tokens": 0},
        )
    finally:
        engine.shutdown()
    got = [x for x, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
    base = engines["gguf"].generate(
        input_ids=ids,
        return_logprob=True,
        logprob_start_len=0,
        sampling_params={"max_new_tokens": 0},
    )
    want = [x for x, _, _ in base["meta_info"]["input_token_logprobs"][1:]]
    deltas = [abs(a - b) for a, b in zip(got, want)]
    assert sum(deltas) / len(deltas) < 0.1 and max(deltas) < 0.5, (max(deltas), deltas)
    assert abs(ppl / perplexity(engines["gguf"], ids) - 1) <= 0.02, ppl
