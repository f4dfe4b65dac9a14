"""Pipeline parallelism (``plait.core.pp``): ``Engine(pp_size=2)`` with a real worker process
gives pp_size=1's (and transformers') greedy tokens, batched, from the prefix cache and
chunked, with each rank holding only its layers and their KV; micro-batch cuts keep every
token and logits row; combinations it does not support are refused by name.
"""

from __future__ import annotations

import psutil
import pytest
import torch

import plait
from plait.core.engine_config import EngineConfig
from plait.core.forward_batch import ForwardBatch
from plait.core.pp.micro import split_batch
from plait.core.pp.stage import PPStage
from tests.conftest import hf_greedy


def _batch() -> ForwardBatch:
    """Request 0: 5 new tokens after a 3-token prefix; request 1: a 3-token prompt. Logits
    for each request's last token (rows 4 and 7)."""
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return ForwardBatch(
        is_decode=False,
        input_ids=t([10, 11, 12, 13, 14, 20, 21, 22]),
        positions=t([3, 4, 5, 6, 7, 0, 1, 2]),
        out_cache_loc=t([30, 31, 32, 33, 34, 40, 41, 42]),
        req_pool_indices=t([5, 6]),
        seq_lens=t([8, 3]),
        prefix_lens=t([3, 0]),
        extend_lens=t([5, 3]),
        req_to_token=torch.zeros(8, 16, dtype=torch.int32),
        logits_rows=t([4, 7]),
        seq_lens_cpu=[8, 3],
        prefix_lens_cpu=[3, 0],
        extend_lens_cpu=[5, 3],
    )


def test_micro_batches_cut_by_tokens_splitting_a_request_like_chunked_prefill():
    first, second = split_batch(_batch(), 2)
    # tokens 0..4: request 0's first four new tokens (no logits row)
    assert first.input_ids.tolist() == [10, 11, 12, 13]
    assert (first.prefix_lens_cpu, first.extend_lens_cpu, first.seq_lens_cpu) == ([3], [4], [7])
    assert first.req_pool_indices.tolist() == [5] and first.logits_rows.numel() == 0
    # tokens 4..8: request 0's last token (its prefix now 7) and request 1
    assert second.input_ids.tolist() == [14, 20, 21, 22]
    assert second.positions.tolist() == [7, 0, 1, 2]
    assert second.out_cache_loc.tolist() == [34, 40, 41, 42]
    assert (second.prefix_lens_cpu, second.extend_lens_cpu) == ([7, 0], [1, 3])
    assert second.seq_lens.tolist() == [8, 3] and second.req_pool_indices.tolist() == [5, 6]
    assert second.logits_rows.tolist() == [0, 3]  # the batch's rows 4 and 7, in order
    assert len(split_batch(_batch(), 20)) == 8  # never an empty micro-batch
    assert split_batch(_batch(), 1)[0].input_ids.tolist() == _batch().input_ids.tolist()


def test_stages_split_layers_evenly_and_refuse_too_few():
    stages = [PPStage(rank=r, size=3, num_layers=8) for r in range(3)]
    assert [(s.start, s.stop) for s in stages] == [(0, 3), (3, 6), (6, 8)]
    assert stages[0].first and stages[2].last and stages[0].largest_share() == 3
    with pytest.raises(ValueError, match="pp_size=3: the model has 2 decoder layers"):
        PPStage(rank=0, size=3, num_layers=2)


def test_a_stage_loads_only_its_layers_and_a_tied_head_from_the_embedding(make_tiny_model):
    from transformers import AutoModelForCausalLM

    from plait.models.loader import load_config, load_model

    path = make_tiny_model("llama", num_hidden_layers=3, tie_word_embeddings=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = load_config(path)
    cpu = torch.device("cpu")

    def stage(rank: int) -> torch.nn.Module:
        pp = PPStage(rank=rank, size=2, num_layers=3)
        return load_model(path, config, torch.float32, cpu, 64, pp=pp)

    first, last = stage(0), stage(1)
    names = lambda m: {n.split(".weight")[0].split(".bias")[0] for n, _ in m.named_parameters()}  # noqa: E731
    assert {n for n in names(first) if not n.startswith("layers.")} == {"embed_tokens"}
    assert {n.split(".")[1] for n in names(first) if n.startswith("layers.")} == {"0", "1"}
    assert {n for n in names(last) if not n.startswith("layers.")} == {"norm", "lm_head"}
    assert {n.split(".")[1] for n in names(last) if n.startswith("layers.")} == {"0"}
    assert [layer.self_attn.layer_id for layer in last.layers] == [0]  # its own KV pool's
    hf_layer2 = hf.model.layers[2].self_attn.q_proj.weight
    q_rows = hf_layer2.shape[0]
    assert torch.equal(last.layers[0].self_attn.qkv_proj.weight[:q_rows], hf_layer2)
    assert torch.equal(last.lm_head.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"tp_size": 2}, "tp_size=2"),
        ({"disaggregation_mode": "prefill"}, "disaggregation_mode"),
        ({"max_lora_rank": 8}, "lora_paths"),
        ({"speculative_algorithm": "NGRAM"}, "speculative_algorithm"),
        ({"quantization": "int8"}, "quantization"),
        ({"enable_graph_capture": True}, "enable_graph_capture"),
        ({"pp_size": 0}, "pp_size must be a positive integer"),
    ],
)
def test_unsupported_combinations_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        EngineConfig(**{"pp_size": 2, **options}).validate()


def test_server_flags_refuse_dp_and_pd_with_pp():
    from plait.server.server_args import ServerArgs

    with pytest.raises(ValueError, match="--dp 2 with --pp 2"):
        ServerArgs(pp=2, dp=2).validate()
    with pytest.raises(ValueError, match="--pd 1P1D with --pp 2"):
        ServerArgs(pp=2, pd="1P1D").validate()
    with pytest.raises(ValueError, match=r"--pp 2\) with tp_size=2 \(--tp\)"):
        ServerArgs(pp=2, tp=2).validate()
    assert ServerArgs(pp=2).engine_kwargs("m")["pp_size"] == 2


def test_a_non_llama_model_is_refused_before_any_rank_starts(make_tiny_model, spawned_children):
    with pytest.raises(ValueError, match="'Qwen3ForCausalLM' does not support pipeline"):
        plait.Engine(make_tiny_model("qwen3", head_dim=16), pp_size=2)
    assert not spawned_children()


@pytest.mark.slow  # a worker process: ~15 s on 2 idle cores, minutes when they are busy
def test_pp2_matches_pp1_and_transformers_batched_cached_and_chunked(make_tiny_model):
    """3 layers on 2 ranks (2 + 1); a 60-token prompt is prefilled in 16-token chunks after a
    40-token prefix-cache hit, in a batch with three others."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("llama", num_hidden_layers=3)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[5, 17, 300, 4000], [9] * 8 + [120], list(range(100, 160)), [7] * 30 + [8]]
    greedy = {"max_new_tokens": 10, "temperature": 0}
    want = hf_greedy(hf, prompts, 10)
    got, info = {}, {}
    for pp in (1, 2):
        with plait.Engine(path, pp_size=pp, chunked_prefill_size=16) as engine:
            engine.generate(input_ids=prompts[2][:40], sampling_params={"max_new_tokens": 0})
            out = engine.generate(input_ids=prompts, sampling_params=greedy)
            got[pp] = [o["output_ids"] for o in out]
            assert out[2]["meta_info"]["cached_tokens"] >= 32  # whole pages of the 40
            info[pp] = engine.get_server_info()
            if pp == 2:
                pids = [p.pid for p in engine._tp_runner.ranks.procs]
    assert got[2] == got[1] == want
    ranks = {r["rank"]: r for r in info[2]["pp_ranks"]}
    assert (ranks[0]["layers"], ranks[0]["kv_layers"]) == ((0, 2), 2)
    assert (ranks[1]["layers"], ranks[1]["kv_layers"]) == ((2, 3), 1)
    assert (ranks[0]["embedding"], ranks[0]["lm_head"]) == (True, False)
    assert (ranks[1]["embedding"], ranks[1]["lm_head"]) == (False, True)
    # the two stages' weights are the whole model's, each held once (pp=1's own report)
    full = info[1]["tp_ranks"][0]["weight_bytes"]
    assert ranks[0]["weight_bytes"] + ranks[1]["weight_bytes"] == full
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_micro_batches_run_in_order_give_the_whole_batch_logits(make_tiny_model):
    """The cut's contract, through a real runner and attention: running the micro-batches one
    after another (as every stage does) gives the whole batch's logits rows, a request split
    across micro-batches included."""
    with plait.Engine(make_tiny_model("llama"), disable_radix_cache=True) as engine:
        runner = engine.scheduler.runner
        lens = [11, 6, 1]
        r2t = runner.req_pool.req_to_token
        slots, ids, pos, rows = [], [], [], []
        for i, n in enumerate(lens):
            mine = list(range(200 + 100 * i, 200 + 100 * i + n))
            r2t[i, :n] = torch.tensor(mine, dtype=r2t.dtype)
            slots += mine
            ids += [(37 * i + 11 * j) % 5000 + 3 for j in range(n)]
            pos += list(range(n))
            rows.append(len(ids) - 1)
        t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        batch = ForwardBatch(
            is_decode=False,
            input_ids=t(ids),
            positions=t(pos),
            out_cache_loc=t(slots),
            req_pool_indices=t([0, 1, 2]),
            seq_lens=t(lens),
            prefix_lens=t([0, 0, 0]),
            extend_lens=t(lens),
            req_to_token=r2t,
            logits_rows=t(rows),
            seq_lens_cpu=lens,
            prefix_lens_cpu=[0, 0, 0],
            extend_lens_cpu=lens,
        )
        whole = runner.run(batch)
        micro = split_batch(batch, 3)
        assert [m.extend_lens_cpu for m in micro] == [[6], [5, 1], [5, 1]]
        pieces = torch.cat([runner.run(m) for m in micro])
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-4)
    assert torch.equal(pieces.argmax(-1), whole.argmax(-1))


def test_each_stage_pool_is_sized_by_the_largest_stage_layers(make_tiny_model):
    """A stage's pool holds its layers only: the per-rank budget buys 3/2 the slots when 3
    layers are split 2 + 1 (rank 0's two layers set the size)."""
    from plait.core.engine_builder import size_kv_pool
    from plait.models.loader import load_config

    hf = load_config(make_tiny_model("llama", num_hidden_layers=3))
    one, two = (
        size_kv_pool(
            hf, EngineConfig(pp_size=n, page_size=1, kv_cache_memory_gb=0.01), torch.float32
        )
        for n in (1, 2)
    )
    assert two == one * 3 // 2
