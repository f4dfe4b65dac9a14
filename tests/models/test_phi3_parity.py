"""Phi-3: a checkpoint with fused ``qkv_proj`` and ``gate_up_proj`` tensors (split by the
loader into Plait's layout, per tensor-parallel rank): greedy tokens equal transformers'
float32, batched, with chunked prefill and after a prefix-cache hit.

``longrope`` (short factors up to ``original_max_position_embeddings``, 32 here; long
factors and the attention factor past it) follows transformers' Phi-3: a forward picks the
factors by the length it reaches, and a generation that crosses 32 is prefilled again whole
with the long factors (Phi-3's ``generate`` drops its cache there). Sequences within 32
match ``generate`` batched, chunked and cached; prompts past 32 and generations crossing 32
match it, batched and cached, when each such prefill is one piece (a chunked one is
transformers' forward over those chunks, not ``generate``).
"""

from __future__ import annotations

import torch

import plait
from tests.models.hf_parity import GREEDY, assert_engine_matches, build_tiny, hf_tokens

ORIGINAL = 32
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
    "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0],
    "original_max_position_embeddings": ORIGINAL,
}


def test_phi3_fused_checkpoint_matches_transformers(tmp_path, smollm_dir):
    path = build_tiny(tmp_path, "phi3", smollm_dir, sliding_window=None)
    assert_engine_matches(path, hf_tokens(path))


def stepwise_tokens(path, ids: list[int], new: int) -> list[int]:
    """transformers' greedy tokens one forward per token over its own cache, without
    ``generate``'s recompute at the crossing (what Plait would give without its re-prefill)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cache, step, out = DynamicCache(config=model.config), torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=step, cache=cache, use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
            step = torch.tensor([[out[-1]]])
    return out


def test_phi3_longrope_matches_transformers(tmp_path, smollm_dir):
    path = build_tiny(
        tmp_path,
        "phi3",
        smollm_dir,
        rope_parameters=LONGROPE,
        max_position_embeddings=128,
        original_max_position_embeddings=ORIGINAL,
        sliding_window=None,
    )
    short = dict(LONGROPE, long_factor=LONGROPE["short_factor"])
    within = [list(range(300, 312)), [5, 17, 300, 4000, 41], list(range(300, 310)) + [7, 8]]
    want = hf_tokens(path, within, 16)  # every sequence ends within 32: short factors
    assert_engine_matches(path, want, within, new=16, chunk=4, context_length=96)
    want = hf_tokens(path, within, 28)  # every generation crosses 32: re-prefilled whole
    assert_engine_matches(path, want, within, new=28, chunk=None, context_length=96)
    long = [list(range(1000, 1040))]  # 40 tokens: long factors from the first forward
    want_long = hf_tokens(path, long, 12)
    assert hf_tokens(path, long, 12, rope_parameters=short) != want_long  # long factors matter
    # 21 tokens + 16: decode crosses 32 at step 12. A prefix of ``long``, served after it:
    # the long prompt's keys (long factors) must not be reused for it
    crossing = [list(range(1000, 1021))]
    want_crossing = hf_tokens(path, crossing, 16)
    # without generate's recompute at the switch the tokens differ from step 12 on
    assert stepwise_tokens(path, crossing[0], 16) != want_crossing[0]
    with plait.Engine(str(path), max_total_tokens=1024, context_length=96) as engine:
        got = engine.generate(input_ids=long, sampling_params={**GREEDY, "max_new_tokens": 12})
        assert [o["output_ids"] for o in got] == want_long
        got = engine.generate(input_ids=crossing, sampling_params=GREEDY)
        assert [o["output_ids"] for o in got] == want_crossing
        assert got[0]["meta_info"]["cached_tokens"] == 0
        again = engine.generate(input_ids=long, sampling_params={**GREEDY, "max_new_tokens": 12})
        assert [o["output_ids"] for o in again] == want_long
        assert again[0]["meta_info"]["cached_tokens"] > 0  # long prompts share their keys
