"""Gemma 2 and Gemma 3 text: greedy tokens equal transformers' float32 on tiny random
checkpoints, batched, with chunked prefill and after a prefix-cache hit.

Gemma 2 runs far past its sliding window (8) with attention-logit soft-capping active: the
same weights with the cap or the window removed give other tokens in transformers, so an
engine ignoring either cannot pass. Gemma 3 alternates local and global layers with their
own RoPE bases, normalises q and k per head, and caps its final logits. Both exercise the
``(1 + w)`` norms (perturbed weights), embedding scaling, GeGLU and ``query_pre_attn_scalar``
(24, not head_dim 16). A backend that cannot cap logits, or apply per-layer scales, refuses.
"""

from __future__ import annotations

import pytest

from plait.backends.cpu.attention import TorchAttentionBackend
from plait.core.attention_api import AttentionBackend
from plait.core.backend_api import KVPool
from plait.models.gemma import GemmaForCausalLM
from tests.models.hf_parity import PROMPTS, assert_engine_matches, build_tiny, hf_tokens

WINDOW = 8
GEMMA = dict(
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=WINDOW,
    num_hidden_layers=3,
    tie_word_embeddings=True,
    final_logit_softcapping=3.0,
)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory, smollm_dir):
    return build_tiny(
        tmp_path_factory.mktemp("gemma2"),
        "gemma2",
        smollm_dir,
        attn_logit_softcapping=2.0,
        **GEMMA,
    )


def test_gemma2_past_its_window_with_softcapping_matches_transformers(gemma2):
    want = hf_tokens(gemma2)
    few = PROMPTS[2:3]  # 49 tokens: far past the window
    assert hf_tokens(gemma2, few, attn_logit_softcapping=None) != want[2:3]
    assert hf_tokens(gemma2, few, sliding_window=4096) != want[2:3]
    engine = assert_engine_matches(gemma2, want)
    runner = engine.scheduler.runner
    assert type(runner.model) is GemmaForCausalLM
    assert runner.attn.sliding_windows == (WINDOW, None, WINDOW)
    assert runner.attn.logit_softcaps == (2.0,) * 3
    assert runner.attn.scale == 24**-0.5


def test_gemma3_text_matches_transformers(tmp_path, smollm_dir):
    path = build_tiny(
        tmp_path,
        "gemma3_text",
        smollm_dir,
        sliding_window_pattern=2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        **GEMMA,
    )
    want = hf_tokens(path)
    engine = assert_engine_matches(path, want, chunk=32)
    runner = engine.scheduler.runner
    assert runner.attn.sliding_windows == (WINDOW, None, WINDOW)
    rotaries = runner.model.rotaries
    assert not rotaries["sliding_attention"].cos.equal(rotaries["full_attention"].cos)


def test_a_backend_that_cannot_cap_logits_refuses_gemma2(gemma2, monkeypatch):
    import plait

    monkeypatch.setattr(TorchAttentionBackend, "supports_logit_softcap", False)
    with pytest.raises(ValueError, match="attn_logit_softcapping=2.0 is not supported by the"):
        plait.Engine(str(gemma2), max_total_tokens=1024)


class _OneScale(AttentionBackend):
    def forward_extend(self, q, layer_id, batch):
        raise AssertionError

    forward_decode = forward_extend


def test_per_layer_scales_are_refused_where_unsupported_and_one_scale_is_the_scale():
    import torch

    pool = KVPool(4, 2, 1, 16, torch.float32, "cpu")
    attn = _OneScale(pool, 2, 1, 16)
    attn.set_layer_scales((0.2, 0.2))
    assert attn.scale == 0.2 and attn.scale_of(1) == 0.2
    with pytest.raises(ValueError, match=r"per-layer softmax scales \[0.1, 0.2\]"):
        attn.set_layer_scales((0.1, 0.2))
