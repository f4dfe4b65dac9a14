"""int8 and int4 weight-only quantization on the new dense architectures (Qwen3, Gemma 2 and
3, Phi-3, whose checkpoint stores qkv and gate_up fused):
the engine's greedy tokens, batched, chunked and after a prefix-cache hit, equal
transformers' float32 on the same checkpoint whose projections hold the engine's
dequantized weights (quantized row by row and group by group, so the engine's fused
qkv/gate_up rows quantize as the separate ones do; the LM head stays float, as the engine
keeps it). The quantized weights change transformers' tokens, so an engine that ignored
``quantization`` could not pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.quant.formats import dequantize, quantize_int4, quantize_int8
from plait.quant.modules import QuantizedLinear
from tests.models.hf_parity import PROMPTS, assert_engine_matches, build_tiny, hf_tokens

ARCHS = {
    "qwen3": dict(head_dim=32),
    "gemma2": dict(
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        num_hidden_layers=3,
        tie_word_embeddings=True,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=2.0,
    ),
    "gemma3_text": dict(
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        sliding_window_pattern=2,
        num_hidden_layers=3,
        tie_word_embeddings=True,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    "phi3": dict(sliding_window=None),
}


def dequantized_copy(src: Path, dst: Path, method: str) -> Path:
    """``src`` with every decoder-layer Linear replaced by its dequantized ``method`` weight
    (the engine's defaults: int8 per channel, int4 asymmetric groups of 32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    quantize = quantize_int8 if method == "int8" else quantize_int4
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in [*layer.self_attn.modules(), *layer.mlp.modules()]:
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(dequantize(quantize(lin.weight)))
    model.save_pretrained(dst)
    return dst


@pytest.mark.parametrize(
    "arch,method",
    [("qwen3", "int8"), ("gemma2", "int4"), ("gemma3_text", "int4"), ("phi3", "int4")],
)
def test_quantized_dense_model_matches_transformers_on_dequantized_weights(
    tmp_path, smollm_dir, arch, method
):
    path = build_tiny(tmp_path / "float", arch, smollm_dir, **ARCHS[arch])
    want = hf_tokens(dequantized_copy(path, tmp_path / "dequantized", method))
    assert hf_tokens(path, PROMPTS[2:3]) != want[2:3]  # the quantization shows in the tokens
    engine = assert_engine_matches(path, want, quantization=method)
    model = engine.scheduler.runner.model
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
