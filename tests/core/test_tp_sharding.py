"""Tensor-parallel sharding without processes: which heads and rows each rank owns, that the
loader reads exactly those slices, and that the shards' forward (ranks as threads, the
collectives done in memory) reproduces the unsharded model's logits."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from plait.core.tp.group import TPGroup
from plait.core.tp.sharding import HeadShard, check_tp_size, shard_heads, split_range
from plait.models import loader


def test_split_range_is_balanced_and_covers_everything():
    parts = [split_range(10, 3, i) for i in range(3)]
    assert parts == [(0, 4), (4, 7), (7, 10)]


@pytest.mark.parametrize(
    "hq,hkv,tp,want",
    [
        (4, 2, 2, [(0, 2, 0, 1), (2, 2, 1, 1)]),
        # SmolLM2: 3 KV groups of 3 on 2 ranks -> 2 groups and 1 group
        (9, 3, 2, [(0, 6, 0, 2), (6, 3, 2, 1)]),
        # fewer KV heads than ranks: each KV head replicated on 2 ranks sharing its query heads
        (8, 2, 4, [(0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]),
    ],
)
def test_heads_split_by_whole_kv_groups(hq, hkv, tp, want):
    # (q_start, num_heads, kv_start, num_kv_heads) per rank
    want = [HeadShard(q_start=q, num_heads=n, kv_start=k, num_kv_heads=m) for q, n, k, m in want]
    assert [shard_heads(hq, hkv, tp, r) for r in range(tp)] == want


@pytest.mark.parametrize("hq,hkv,tp", [(3, 1, 2), (6, 2, 3), (4, 4, 8)])
def test_unsplittable_head_counts_are_refused_naming_them(hq, hkv, tp):
    with pytest.raises(
        ValueError,
        match=f"tp_size={tp} cannot split num_attention_heads={hq} with num_key_value_heads={hkv}",
    ):
        check_tp_size(hq, hkv, tp)


def test_engine_refuses_unsplittable_heads_before_starting_ranks(make_tiny_model):
    import plait

    path = make_tiny_model("mistral", hidden_size=48, num_attention_heads=3, num_key_value_heads=1)
    with pytest.raises(ValueError, match="num_attention_heads=3 with num_key_value_heads=1"):
        plait.Engine(path, tp_size=2)
    with pytest.raises(ValueError, match="tp_size"):
        plait.Engine(path, tp_size=0)


UNEVEN = dict(
    hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=100
)  # 3 KV groups and 100 MLP columns over 2 ranks


def test_each_rank_loads_exactly_its_slices(make_tiny_model):
    from safetensors.torch import load_file

    path = make_tiny_model("qwen2", **UNEVEN)
    config = loader.load_config(path)
    state = load_file(str(path / "model.safetensors"))
    d = 16
    for rank in range(2):
        model = loader.load_model(
            path, config, torch.float32, torch.device("cpu"), 64, TPGroup(rank=rank, size=2)
        )
        attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
        s, (i0, i1) = attn.shard, mlp.inter_range
        q = state["model.layers.1.self_attn.q_proj.weight"][
            s.q_start * d : (s.q_start + s.num_heads) * d
        ]
        kv = slice(s.kv_start * d, (s.kv_start + s.num_kv_heads) * d)
        k = state["model.layers.1.self_attn.k_proj.weight"][kv]
        v_bias = state["model.layers.1.self_attn.v_proj.bias"][kv]
        assert torch.equal(
            attn.qkv_proj.weight,
            torch.cat([q, k, state["model.layers.1.self_attn.v_proj.weight"][kv]]),
        )
        assert torch.equal(attn.qkv_proj.bias[-v_bias.shape[0] :], v_bias)
        o = state["model.layers.1.self_attn.o_proj.weight"]
        assert torch.equal(attn.o_proj.weight, o[:, s.q_start * d : (s.q_start + s.num_heads) * d])
        assert torch.equal(
            mlp.down_proj.weight, state["model.layers.1.mlp.down_proj.weight"][:, i0:i1]
        )
        assert torch.equal(
            mlp.gate_up_proj.weight[mlp.inter :], state["model.layers.1.mlp.up_proj.weight"][i0:i1]
        )
        v0, v1 = model.embed_tokens.vocab_start, model.embed_tokens.vocab_stop
        assert torch.equal(model.embed_tokens.weight, state["model.embed_tokens.weight"][v0:v1])
        assert torch.equal(model.lm_head.weight, state["lm_head.weight"][v0:v1])


@dataclass
class _Hub:
    """In-memory collectives for ranks running as threads."""

    size: int
    barrier: threading.Barrier = None
    slots: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.barrier = threading.Barrier(self.size)
        self.slots = [None] * self.size

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        pieces = list(self.slots)
        self.barrier.wait()
        return pieces


@dataclass(frozen=True)
class _ThreadGroup(TPGroup):
    hub: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        pieces = self.hub.exchange(self.rank, x)
        return x.copy_(sum(pieces[1:], pieces[0]))

    def all_gather_last_dim(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return torch.cat(self.hub.exchange(self.rank, x), dim=-1)


def _prefill_logits(model: Any, ids: list[int]) -> torch.Tensor:
    from plait.backends.cpu.attention import TorchAttentionBackend
    from plait.core.backend_api import KVPool
    from plait.core.forward_batch import ForwardBatch

    attn0 = model.layers[0].self_attn
    n = len(ids)
    pool = KVPool(
        n + 1, len(model.layers), attn0.num_kv_heads, attn0.head_dim, torch.float32, "cpu"
    )
    r2t = torch.arange(1, n + 1, dtype=torch.int32)[None, :]
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    batch = ForwardBatch(
        is_decode=False,
        input_ids=t(ids),
        positions=t(list(range(n))),
        out_cache_loc=t(list(range(1, n + 1))),
        req_pool_indices=t([0]),
        seq_lens=t([n]),
        prefix_lens=t([0]),
        extend_lens=t([n]),
        req_to_token=r2t,
        logits_rows=t(list(range(n))),
        seq_lens_cpu=[n],
        prefix_lens_cpu=[0],
        extend_lens_cpu=[n],
    )
    attn = TorchAttentionBackend(pool, attn0.num_heads, attn0.num_kv_heads, attn0.head_dim)
    return model(batch, attn)


@pytest.mark.parametrize(
    "model_type,overrides",
    [("llama", {}), ("qwen2", UNEVEN)],
    ids=["llama-4-2", "qwen2-6-3-uneven"],
)
def test_shards_in_threads_reproduce_the_full_models_logits(make_tiny_model, model_type, overrides):
    path = make_tiny_model(model_type, **overrides)
    config = loader.load_config(path)
    ids = list(range(300, 340))
    full = loader.load_model(path, config, torch.float32, torch.device("cpu"), 64)
    want = _prefill_logits(full, ids)
    hub, got = _Hub(2), [None, None]

    def rank(r: int) -> None:
        model = loader.load_model(
            path,
            config,
            torch.float32,
            torch.device("cpu"),
            64,
            _ThreadGroup(rank=r, size=2, hub=hub),
        )
        got[r] = _prefill_logits(model, ids)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert torch.equal(got[0], got[1])
    # fp32 partial sums added in another order: equal to rounding, same argmax everywhere
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0].argmax(-1), want.argmax(-1))
