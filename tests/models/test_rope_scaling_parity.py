"""RoPE scaling types on a tiny Llama: ``llama3``, ``yarn`` and ``dynamic`` (NTK) give
transformers' float32 greedy tokens, batched, with chunked prefill and after a prefix-cache
hit; each scaling changes transformers' tokens, so ignoring it cannot pass.

``dynamic`` recomputes its frequencies from the sequence length of each forward past
``max_position_embeddings`` (32 here), as transformers does: generations cross that length
in every prompt; a prompt longer than it matches when prefilled in one piece (transformers'
own result depends on how a prompt past the length is split, so chunks there cannot be
compared). The oracle reloads the model per prompt: transformers keeps the stretched
frequencies between ``generate`` calls.
"""

from __future__ import annotations

import pytest

import plait
from tests.models.hf_parity import GREEDY, assert_engine_matches, build_tiny, hf_tokens

LLAMA = dict(head_dim=16, max_position_embeddings=256)
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


@pytest.mark.parametrize("rope_type", list(SCALINGS))
def test_static_scaling_matches_transformers(tmp_path, smollm_dir, rope_type):
    path = build_tiny(tmp_path, "llama", smollm_dir, rope_parameters=SCALINGS[rope_type], **LLAMA)
    want = hf_tokens(path)
    assert hf_tokens(path, rope_parameters=DEFAULT) != want
    assert_engine_matches(path, want)


def per_prompt(path, prompts, new=16, **overrides):
    return [hf_tokens(path, [p], new, **overrides)[0] for p in prompts]


def test_dynamic_ntk_matches_transformers_within_and_past_the_length(tmp_path, smollm_dir):
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    path = build_tiny(
        tmp_path,
        "llama",
        smollm_dir,
        rope_parameters=dynamic,
        head_dim=16,
        max_position_embeddings=32,
    )
    shared = list(range(300, 318))
    within = [shared + [7, 8, 9], [5, 17, 300, 4000, 41], shared + list(range(2000, 2010))]
    want = per_prompt(path, within, 24)
    assert per_prompt(path, within[:1], 24, rope_parameters=DEFAULT) != want[:1]
    # every generation crosses length 32: batched, chunked and cached
    assert_engine_matches(path, want, within, new=24, chunk=8, context_length=96)
    long = [list(range(1000, 1045))]  # a 45-token prompt, past 32, prefilled whole
    with plait.Engine(str(path), max_total_tokens=1024, context_length=96) as engine:
        got = engine.generate(input_ids=long, sampling_params={**GREEDY, "max_new_tokens": 12})
    assert [o["output_ids"] for o in got] == per_prompt(path, long, 12)
