"""Every tensor-parallel rank holds only its shard and captures decode exactly when the flags
say, as each rank reports it (``get_server_info()["tp_ranks"]``; ranks 1..N-1 report from their
worker process). The tp 2 test is slow: real worker processes.

The parity tests cannot see a rank that loaded the whole model: two full copies emit the same
tokens. These facts can: heads, MLP rows and vocabulary rows are halved on 2 ranks, and so are
the bytes of the sharded weights, while norms stay whole.
"""

from __future__ import annotations

import pytest
import torch

import plait
from tests.conftest import hf_greedy

# A small vocabulary, so the layers' weights are a visible part of the bytes (49152 rows of
# embedding and LM head would dwarf them).
SHAPE = dict(vocab_size=512, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
# Weights split over the ranks (rows or columns): every other tensor (the norms) is replicated.
SHARDED = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "embed_tokens.weight",
    "lm_head.weight",
)


def _checkpoint_bytes(path) -> tuple[int, int]:
    """(sharded, replicated) float32 bytes of the checkpoint's tensors."""
    from safetensors.torch import load_file

    sharded = replicated = 0
    for name, t in load_file(str(path / "model.safetensors")).items():
        n = t.numel() * 4
        if name.endswith(SHARDED):
            sharded += n
        else:
            replicated += n
    return sharded, replicated


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,captured",
    [({"disable_graph_capture": True}, False), ({"enable_graph_capture": True}, True)],
    ids=["capture-off", "capture-on"],
)
def test_each_rank_holds_only_its_shard_and_follows_the_capture_flags(
    make_tiny_model, flags, captured
):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("llama", **SHAPE)
    sharded, replicated = _checkpoint_bytes(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[5, 17, 300, 41], [9, 9, 9, 120]]
    with plait.Engine(path, tp_size=2, **flags) as engine:
        ranks = engine.get_server_info()["tp_ranks"]
        got = engine.generate(
            input_ids=prompts, sampling_params={"max_new_tokens": 6, "temperature": 0}
        )
    assert [o["output_ids"] for o in got] == hf_greedy(hf, prompts, 6)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert (r["attention_heads"], r["kv_heads"], r["mlp_rows"], r["vocab_rows"]) == (
            4 // 2,
            2 // 2,
            128 // 2,
            512 // 2,
        ), r
        assert r["decode_captured"] is captured, r
        # Half of every sharded weight, all of the replicated ones (a prepacked Linear's
        # layout and the copies it keeps add at most a quarter).
        want = sharded / 2 + replicated
        assert want <= r["weight_bytes"] <= 1.25 * want, (r, want, sharded + replicated)


def test_one_rank_reports_the_whole_model(make_tiny_model):
    path = make_tiny_model("llama", **SHAPE)
    sharded, replicated = _checkpoint_bytes(path)
    with plait.Engine(path) as engine:
        (rank,) = engine.get_server_info()["tp_ranks"]
    assert (
        rank["rank"],
        rank["attention_heads"],
        rank["kv_heads"],
        rank["mlp_rows"],
        rank["vocab_rows"],
        rank["decode_captured"],
    ) == (0, 4, 2, 128, 512, False)
    assert sharded + replicated <= rank["weight_bytes"] <= 1.25 * (sharded + replicated)
