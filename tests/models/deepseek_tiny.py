"""Tiny random DeepSeek-V2/V3 checkpoints (3 layers, hidden 64, a handful of experts) written
with transformers, and transformers' greedy tokens on them: the oracle of the MLA tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

COMMON = dict(
    vocab_size=49152,  # SmolLM2's tokenizer
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
#: V2: no query compression, group-limited greedy routing, plain RoPE
V2 = dict(
    q_lora_rank=None,
    topk_method="group_limited_greedy",
    n_group=4,
    topk_group=2,
    routed_scaling_factor=1.5,
    architectures=["DeepseekV2ForCausalLM"],
)
#: V3: compressed queries, sigmoid routing with bias correction, YaRN with mscale
V3 = dict(
    q_lora_rank=24,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    rope_interleave=True,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    architectures=["DeepseekV3ForCausalLM"],
)
VERSIONS = {"v2": ("deepseek_v2", V2), "v3": ("deepseek_v3", V3)}


def write_tiny_deepseek(version: str, path: Path, tokenizer_dir: Path, **overrides) -> Path:
    """Save a random checkpoint of ``version`` ("v2"/"v3") with SmolLM2's tokenizer, its
    config changed by ``overrides`` (e.g. DeepSeek's real attention sizes). Weights
    are drawn wider than init's (logits far from ties), norms and the V3 score-correction
    bias random too, so every one of them matters to the output."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = VERSIONS[version]
    config = AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
