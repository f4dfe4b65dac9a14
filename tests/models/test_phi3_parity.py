"""Phi-3: a checkpoint with fused ``qkv_proj`` and ``gate_up_proj`` tensors (split by the
loader into Plait's layout, per tensor-parallel rank): greedy tokens equal transformers'
float32, batched, with chunked prefill and after a prefix-cache hit. Its ``longrope``
scaling is refused by name (not yet token-identical past the original length)."""

from __future__ import annotations

import pytest

import plait
from tests.models.hf_parity import assert_engine_matches, build_tiny, hf_tokens


def test_phi3_fused_checkpoint_matches_transformers(tmp_path, smollm_dir):
    path = build_tiny(tmp_path, "phi3", smollm_dir, sliding_window=None)
    assert_engine_matches(path, hf_tokens(path))


def test_phi3_longrope_is_refused_by_name(tmp_path, smollm_dir):
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 32,
    }
    path = build_tiny(
        tmp_path,
        "phi3",
        smollm_dir,
        rope_parameters=rope,
        max_position_embeddings=128,
        original_max_position_embeddings=32,
        sliding_window=None,
    )
    with pytest.raises(ValueError, match="rope_type 'longrope' is not supported yet"):
        plait.Engine(str(path), max_total_tokens=1024)
