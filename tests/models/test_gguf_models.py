"""GGUF files of Qwen2, Qwen3, Gemma 2 and Gemma 3 run natively (``quantization='gguf'``, the
default for a ``.gguf`` path): attention and embedding in Q8_0 blocks, MLP in Q4_0, written as
llama.cpp lays them out (``tests/models/gguf_file.py``). The oracle is transformers loading the
same file (``gguf_file=``, which dequantizes it): greedy tokens equal, batched, chunked and from
the prefix cache. The blocks change transformers' tokens against the float checkpoint, so an
engine that ran the float weights could not pass; Gemma's norms are stored as ``1 + w``, so a
norm read without the offset changes the tokens too. Architectures without a name map are
refused naming them (mixture-of-experts and Phi-3 files: ``tests/models/test_gguf_moe.py``)."""

from __future__ import annotations

import pytest

from plait.quant.gguf import layer_names_of
from plait.quant.modules import QuantizedEmbedding, QuantizedLinear
from tests.models.gguf_file import write_gguf
from tests.models.hf_parity import (
    PROMPTS_SMALL_VOCAB,
    SMALL_VOCAB,
    assert_engine_matches,
    build_tiny,
    hf_tokens,
)

# 512 tokens (> every prompt id): the writer cuts the tokenizer to the config's vocabulary,
# which keeps gguf-py's metadata parse (seconds for SmolLM2's 49k tokens and merges, and
# still most of each test's time at 4096) short
SMALL = dict(vocab_size=SMALL_VOCAB, pad_token_id=2)
GEMMA = dict(SMALL, std=0.05, head_dim=16, sliding_window=8, tie_word_embeddings=True)
# Only what GGUF metadata states survives the file (transformers fills the rest with its
# defaults: Qwen3's head_dim 128, Gemma's query_pre_attn_scalar 256 and soft-caps 50/30,
# Gemma 3's one global layer in six), so the tiny configs keep to those.
ARCHS = {
    "qwen2": dict(SMALL),
    "qwen3": dict(SMALL, head_dim=128),
    "gemma2": dict(GEMMA, num_hidden_layers=3),
    "gemma3_text": dict(GEMMA, num_hidden_layers=6),
}


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param("qwen2", marks=pytest.mark.slow),
        pytest.param("qwen3", marks=pytest.mark.slow),
        "gemma2",
        pytest.param("gemma3_text", marks=pytest.mark.slow),
    ],
)
def test_gguf_blocks_match_transformers_reading_the_file(tmp_path, smollm_dir, monkeypatch, arch):
    monkeypatch.setenv("PLAIT_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tiny(tmp_path / "float", arch, smollm_dir, **ARCHS[arch])
    gguf = write_gguf(path, tmp_path / "model.gguf", smollm_dir)
    want = hf_tokens(tmp_path, PROMPTS_SMALL_VOCAB, gguf_file=gguf.name)
    assert hf_tokens(path, PROMPTS_SMALL_VOCAB) != want  # the blocks show in the tokens
    engine = assert_engine_matches(gguf, want, PROMPTS_SMALL_VOCAB)
    model = engine.scheduler.runner.model
    layers = model.config.num_hidden_layers
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 4 * layers + 1  # qkv, o, gate_up, down; the LM head
    assert isinstance(model.embed_tokens, QuantizedEmbedding)


def test_architectures_without_a_native_reading_are_refused_naming_them():
    with pytest.raises(ValueError, match="does not read GGUF architecture 'deepseek2'"):
        layer_names_of("deepseek2")
