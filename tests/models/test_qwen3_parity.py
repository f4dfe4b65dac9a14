"""Qwen3 (per-head q/k RMSNorm before RoPE, head_dim from the config): greedy tokens equal
transformers' float32 on a tiny random checkpoint, batched, with chunked prefill and after a
prefix-cache hit; the checkpoint's chat template serves ``Engine.chat``-style prompts."""

from __future__ import annotations

import pytest

import plait
from plait.models.qwen3 import Qwen3ForCausalLM
from plait.models.sliding_window import layer_windows
from tests.models.hf_parity import assert_engine_matches, build_tiny, hf_tokens


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, smollm_dir):
    # head_dim 32 with 4 heads: q is 128 wide on a 64-wide model, as only the config says
    return build_tiny(tmp_path_factory.mktemp("qwen3"), "qwen3", smollm_dir, head_dim=32)


def test_qwen3_matches_transformers(qwen3):
    want = hf_tokens(qwen3)
    engine = assert_engine_matches(qwen3, want)
    model = engine.scheduler.runner.model
    assert type(model) is Qwen3ForCausalLM
    assert model.layers[0].self_attn.head_dim == 32


def test_qwen3_serves_its_chat_template(qwen3):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "hi"}]
    want = AutoTokenizer.from_pretrained(qwen3).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    with plait.Engine(str(qwen3), max_total_tokens=1024) as engine:
        assert (
            engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            == want
        )


def test_qwen3_sliding_window_follows_layer_types():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        "qwen3",
        num_hidden_layers=4,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
    )
    assert layer_windows(cfg, 1024) == tuple(
        16 if t == "sliding_attention" else None for t in cfg.layer_types
    )
