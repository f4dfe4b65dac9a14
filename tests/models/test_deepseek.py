"""DeepSeek-V2/V3 (multi-head latent attention) through the model hook: greedy tokens equal
transformers' in float32 on tiny random checkpoints, batched, with chunked prefill and after
a prefix-cache hit; the pool holds one latent per token and the engine sizes it so; routing
equals transformers' routers; tensor parallelism is refused naming MLA."""

from __future__ import annotations

import pytest
import torch

import plait
from plait.core.mla import LatentKVPool
from tests.conftest import hf_greedy
from tests.models.deepseek_tiny import COMMON, hf_model, write_tiny_deepseek

#: two prompts share a 9-token prefix: the second round hits the cache for all but the last
PROMPTS = [
    [5, 17, 300, 42, 9000, 77, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23],
    [5, 17, 300, 42, 9000, 77, 12, 13, 14, 1000, 2000],
    [30000, 3, 4],
]
NEW = 10
GREEDY = {"max_new_tokens": NEW, "temperature": 0}
KV_GB = 0.001


@pytest.fixture(scope="module", params=["v2", "v3"])
def checkpoint(request, tmp_path_factory, smollm_dir):
    path = write_tiny_deepseek(request.param, tmp_path_factory.mktemp(request.param), smollm_dir)
    return path, hf_greedy(hf_model(path), PROMPTS, NEW)


def test_greedy_matches_transformers_batched_chunked_and_cached(checkpoint):
    path, want = checkpoint
    with plait.Engine(path, kv_cache_memory_gb=KV_GB, chunked_prefill_size=8) as engine:
        first = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in first] == want
        again = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == want
        assert [o["meta_info"]["cached_tokens"] for o in again] == [len(p) - 1 for p in PROMPTS]
        # the pool is the latent: (kv_lora_rank + qk_rope_head_dim) per token and layer
        rt = engine.runtime
        pool = engine.scheduler.runner.kv_pool
        width = COMMON["kv_lora_rank"] + COMMON["qk_rope_head_dim"]
        assert isinstance(pool, LatentKVPool)
        assert len(pool.latent_buffers) == COMMON["num_hidden_layers"]
        page = rt.config.page_size
        assert {tuple(b.shape) for b in pool.latent_buffers} == {
            (rt.max_total_tokens + page, 1, width)
        }
        per_token = width * COMMON["num_hidden_layers"] * 4  # float32
        tokens = int(KV_GB * 2**30) // per_token
        assert rt.max_total_tokens == tokens - tokens % page


def test_tensor_parallel_is_refused_naming_mla(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=r"tp_size=2 .*multi-head latent attention \(MLA\)"):
        plait.Engine(path, tp_size=2, kv_cache_memory_gb=KV_GB)


def test_quantization_is_refused_naming_the_model(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=r"quantization='int8' is not supported for Deepseek"):
        plait.Engine(path, quantization="int8", kv_cache_memory_gb=KV_GB)


def _hf_router(version: int, **overrides):
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    fields = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, **overrides)
    if version == 2:
        return DeepseekV2TopkRouter(DeepseekV2Config(**fields))
    return DeepseekV3TopkRouter(DeepseekV3Config(**fields))


@pytest.mark.parametrize(
    "version,overrides",
    [
        (2, dict(topk_method="greedy", routed_scaling_factor=1.0)),
        (2, dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)),
        (3, dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
        (3, dict(n_group=8, topk_group=3, norm_topk_prob=False, routed_scaling_factor=1.0)),
    ],
    ids=["v2-greedy", "v2-group-limited", "v3-norm", "v3-no-norm"],
)
def test_routing_matches_transformers(version, overrides):
    """Expert ids and weights equal transformers' routers on random tokens (the V3 bias
    large enough to change which experts are chosen, never their weights)."""
    from plait.models.deepseek_moe import route_v2, route_v3

    torch.manual_seed(1)
    router = _hf_router(version, **overrides)
    with torch.no_grad():
        router.weight.normal_(0, 1)
        if version == 3:
            router.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(64, 32)
    _, want_w, want_ids = router(x)
    logits = torch.nn.functional.linear(x, router.weight)
    cfg = router
    kwargs = dict(top_k=cfg.top_k, scaling=cfg.routed_scaling_factor)
    if version == 2:
        weights, ids = route_v2(
            logits,
            method=cfg.topk_method,
            n_group=cfg.num_group,
            topk_group=cfg.topk_group,
            normalize=False,
            **kwargs,
        )
    else:
        weights, ids = route_v3(
            logits,
            router.e_score_correction_bias,
            n_group=cfg.num_group,
            topk_group=cfg.topk_group,
            normalize=cfg.norm_topk_prob,
            **kwargs,
        )
        unbiased = route_v3(
            logits,
            torch.zeros_like(router.e_score_correction_bias),
            n_group=cfg.num_group,
            topk_group=cfg.topk_group,
            normalize=cfg.norm_topk_prob,
            **kwargs,
        )[1]
        assert not torch.equal(ids.sort().values, unbiased.sort().values)  # the bias matters
    order, want_order = ids.argsort(dim=-1), want_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_w.gather(1, want_order))


def test_latent_layout_pool_and_transfer_buffers():
    """A latent layout's bytes per token, the pool it creates (one buffer per layer, the V
    buffers views of the latent's first kv_lora_rank channels) and what disaggregation sends:
    each latent buffer once."""
    from plait.backends.cpu.plugin import CpuBackend
    from plait.core.kv_layout import KVCacheLayout, create_kv_pool, latent_layout
    from plait.disaggregation.bootstrap import kv_buffers

    layout = latent_layout(num_layers=3, kv_lora_rank=16, rope_dim=8)
    assert layout.bytes_per_token(torch.float32) == (16 + 8) * 3 * 4
    assert layout.bytes_per_token(torch.bfloat16) == (16 + 8) * 3 * 2
    pool = create_kv_pool(CpuBackend(), layout, 10, torch.float32, 2)
    assert isinstance(pool, LatentKVPool)
    assert [tuple(b.shape) for b in pool.latent_buffers] == [(12, 1, 24)] * 3
    pool.set_latent(1, torch.tensor([3]), torch.arange(24.0).unsqueeze(0))
    assert pool.v_buffers[1][3, 0].tolist() == list(range(16))
    sent = kv_buffers(pool)
    assert len(sent) == 3 and all(b.is_contiguous() for b in sent)
    with pytest.raises(ValueError, match="latent layout has heads=1"):
        KVCacheLayout(kind="latent", num_layers=1, heads=2, head_dim=8, latent_rank=4)
