"""Phi-3: a checkpoint with fused ``qkv_proj`` and ``gate_up_proj`` tensors, and its
``longrope`` (su) RoPE scaling: greedy tokens equal transformers' float32, batched, with
chunked prefill and after a prefix-cache hit.

longrope switches from the short to the long factors when a forward's sequence passes
``original_max_position_embeddings`` (32 here): every generation below crosses it, and the
factors differ enough that transformers' tokens change with them, so a model that ignored
the switch (or the scaling) cannot pass. A prompt longer than 32 matches when prefilled in
one piece (transformers' result depends on how such a prompt is split).
"""

from __future__ import annotations

import plait
from tests.models.hf_parity import GREEDY, assert_engine_matches, build_tiny, hf_tokens

HEAD_DIM = 16


def factors(seed: float) -> list[float]:
    return [1.0 + seed * i for i in range(HEAD_DIM // 2)]


def test_phi3_longrope_matches_transformers(tmp_path, smollm_dir):
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": factors(0.1),
        "long_factor": factors(3.0),
        "original_max_position_embeddings": 32,
    }
    path = build_tiny(
        tmp_path,
        "phi3",
        smollm_dir,
        rope_parameters=rope,
        max_position_embeddings=128,
        sliding_window=None,
    )
    shared = list(range(300, 318))
    within = [shared + [7, 8, 9], [5, 17, 300, 4000, 41], shared + list(range(2000, 2010))]
    per_prompt = [hf_tokens(path, [p], 24)[0] for p in within]
    short_only = {**rope, "long_factor": rope["short_factor"]}
    assert hf_tokens(path, within[:1], 24, rope_parameters=short_only)[0] != per_prompt[0]
    assert_engine_matches(path, per_prompt, within, new=24, chunk=8)
    long = [list(range(1000, 1045))]
    with plait.Engine(str(path), max_total_tokens=1024) as engine:
        got = engine.generate(input_ids=long, sampling_params={**GREEDY, "max_new_tokens": 8})
    assert [o["output_ids"] for o in got] == hf_tokens(path, long, 8)
