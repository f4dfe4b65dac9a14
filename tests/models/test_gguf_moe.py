"""GGUF files of Mixtral (llama.cpp's ``llama`` with stacked ``ffn_*_exps`` experts),
Qwen2-MoE (plus the shared expert ``ffn_*_shexp`` and its gate), Qwen3-MoE (q/k norms) and
Phi-3 (fused ``attn_qkv``, gate and up fused in ``ffn_up``), written as llama.cpp lays them out
(``tests/models/gguf_file.py``): attention in Q8_0, MLPs and experts in Q4_0 (Q4_1 for
Qwen2-MoE, whose blocks carry mins), routers F32.

The oracle is transformers' float32 greedy output on exactly the file's values (each matrix
quantized and dequantized by gguf-py: ``write_gguf(roundtrip=...)``), since transformers
cannot read a Mixtral GGUF. Plait must give the same tokens (batched, chunked, from the prefix
cache) with the blocks kept (``quantization='gguf'``, experts as quantized Linears) and with
the file dequantized (``'none'``, Plait's own reading: no safetensors are written). The blocks
change the tokens against the float checkpoint, so an engine that ran other weights fails.
"""

from __future__ import annotations

import pytest

from plait.models.moe_quant import QuantizedMoEExperts
from plait.quant.modules import QuantizedLinear
from tests.models.gguf_file import write_gguf
from tests.models.hf_parity import (
    PROMPTS_SMALL_VOCAB,
    SMALL_VOCAB,
    assert_engine_matches,
    build_tiny,
    hf_tokens,
)

VOCAB = SMALL_VOCAB  # > every prompt id; keeps gguf-py's parse of the tokenizer short
PROMPTS = PROMPTS_SMALL_VOCAB
MOE = dict(num_experts_per_tok=2, vocab_size=VOCAB, pad_token_id=2)
ARCHS = {
    "mixtral": dict(MOE, num_local_experts=4, sliding_window=None),
    "qwen2_moe": dict(
        MOE,
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
    ),
    # renormalised top-k, as released Qwen3-MoE checkpoints (and llama.cpp) route
    "qwen3_moe": dict(MOE, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True),
    "phi3": dict(vocab_size=VOCAB, pad_token_id=2),
}
FFN_BLOCKS = {"qwen2_moe": "Q4_1"}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gguf_file_matches_transformers_on_its_values(tmp_path, smollm_dir, monkeypatch, arch):
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny(tmp_path / "float", arch, smollm_dir, **ARCHS[arch])
    oracle = tmp_path / "oracle"
    ffn = FFN_BLOCKS.get(arch, "Q4_0")
    gguf = write_gguf(path, tmp_path / "model.gguf", smollm_dir, ffn=ffn, roundtrip=oracle)
    want = hf_tokens(oracle, PROMPTS)
    assert hf_tokens(path, PROMPTS) != want  # the blocks show in the tokens
    engine = assert_engine_matches(gguf, want, PROMPTS)  # quantization='gguf', by the path
    model = engine.scheduler.runner.model
    layers = model.config.num_hidden_layers
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if arch == "phi3":
        assert len(quantized) == 4 * layers + 1  # qkv, o, gate_up, down; the LM head
    else:
        experts = [m for m in model.modules() if isinstance(m, QuantizedMoEExperts)]
        assert len(experts) == layers
        assert all(len(e.gate_up) == len(e.down) == e.num_experts for e in experts)
    engine = assert_engine_matches(gguf, want, PROMPTS, quantization="none")
    model = engine.scheduler.runner.model
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
