"""``--tp 2`` on the dense architectures beyond Llama (Qwen3, Gemma 2 and 3, Phi-3): real rank
processes over gloo on the CPU give transformers' greedy tokens (what tp 1 gives, see each
architecture's parity test), batched, chunked and from the prefix cache, while each rank
reports holding half the heads, MLP rows and vocabulary rows. Phi-3's checkpoint stores
``qkv_proj`` and ``gate_up_proj`` fused: each rank's rows of every piece are cut out of the
fused tensor (checked slice by slice without processes). Head counts two ranks cannot split
are refused naming them, before any rank starts."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.core.tp.group import TPGroup
from plait.models import loader
from tests.models.hf_parity import PROMPTS, build_tiny, engine_tokens, hf_tokens
from tests.models.test_quantized_dense import ARCHS


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_tp2_matches_transformers_and_each_rank_holds_half(tmp_path, smollm_dir, arch):
    path = build_tiny(tmp_path, arch, smollm_dir, **ARCHS[arch])
    want = hf_tokens(path, PROMPTS[:3], 8)
    kwargs = dict(tp_size=2, max_total_tokens=4096, chunked_prefill_size=16)
    with plait.Engine(str(path), **kwargs) as engine:
        ranks = engine.get_server_info()["tp_ranks"]
        assert engine_tokens(engine, PROMPTS[:3], 8) == want
    config = loader.load_config(path)
    half = (
        config.num_attention_heads // 2,
        config.num_key_value_heads // 2,
        config.intermediate_size // 2,
        config.vocab_size // 2,
    )
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert (r["attention_heads"], r["kv_heads"], r["mlp_rows"], r["vocab_rows"]) == half, r


def test_phi3_ranks_cut_their_rows_out_of_the_fused_checkpoint_tensors(tmp_path, smollm_dir):
    from safetensors.torch import load_file

    path = build_tiny(tmp_path, "phi3", smollm_dir, **ARCHS["phi3"])
    config = loader.load_config(path)
    state = load_file(str(path / "model.safetensors"))
    qkv = state["model.layers.1.self_attn.qkv_proj.weight"]
    gate_up = state["model.layers.1.mlp.gate_up_proj.weight"]
    d, inter = config.hidden_size // config.num_attention_heads, config.intermediate_size
    q, k, v = qkv.split([config.num_attention_heads * d, *[config.num_key_value_heads * d] * 2])
    gate, up = gate_up.split(inter)
    for rank in range(2):
        model = loader.load_model(
            path, config, torch.float32, torch.device("cpu"), 64, TPGroup(rank=rank, size=2)
        )
        attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
        s, (i0, i1) = attn.shard, mlp.inter_range
        kv = slice(s.kv_start * d, (s.kv_start + s.num_kv_heads) * d)
        mine = torch.cat([q[s.q_start * d : (s.q_start + s.num_heads) * d], k[kv], v[kv]])
        assert torch.equal(attn.qkv_proj.weight, mine)
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate[i0:i1], up[i0:i1]]))
        assert (s.num_heads, i1 - i0) == (config.num_attention_heads // 2, inter // 2)


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_heads_two_ranks_cannot_split_are_refused_naming_them(tmp_path, smollm_dir, arch):
    extra = dict(ARCHS[arch], num_attention_heads=3, num_key_value_heads=1, hidden_size=48)
    extra.setdefault("head_dim", 16)
    path = build_tiny(tmp_path, arch, smollm_dir, **extra)
    with pytest.raises(ValueError, match="tp_size=2 cannot split num_attention_heads=3 with num_"):
        plait.Engine(str(path), tp_size=2)
