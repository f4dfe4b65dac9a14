"""``Engine(tp_size=2)`` with real worker processes (slow: each start costs seconds on 2 cores).

tp_size=2 must give transformers' greedy tokens (which tp_size=1 gives too: see
test_engine_parity.py) on the parity prompts, batched, from the prefix cache and chunked; a
rank that fails to start fails the engine with its error; shutdown leaves no process and no
bound port behind.
"""

from __future__ import annotations

import re
import socket

import psutil
import pytest
import torch

import plait
from tests.conftest import hf_greedy
from tests.core.test_engine_parity import GREEDY, run_batch

pytestmark = pytest.mark.slow


def _worker_pids_and_port(engine: plait.Engine) -> tuple[list[int], int]:
    ranks = engine._tp_runner.ranks
    return [p.pid for p in ranks.procs], ranks.port


def _assert_all_gone(pids: list[int], port: int, spawned_children) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with socket.socket() as s:  # the rendezvous port is free again
        s.bind(("127.0.0.1", port))
    assert not spawned_children()


def test_tp2_matches_transformers_batched_cached_and_chunked(
    smollm_dir, prompt_ids, expected, spawned_children
):
    # SmolLM2 has 9 query / 3 KV heads: rank 0 holds 2 KV groups, rank 1 one.
    with plait.Engine(smollm_dir, tp_size=2, chunked_prefill_size=64) as engine:
        pids, port = _worker_pids_and_port(engine)
        assert len(pids) == 1
        engine.generate(input_ids=prompt_ids[4][:40], sampling_params={"max_new_tokens": 0})
        assert run_batch(engine, prompt_ids) == expected
        again = engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert all(
            o["meta_info"]["cached_tokens"] == len(ids) - 1 for o, ids in zip(again, prompt_ids)
        )
    _assert_all_gone(pids, port, spawned_children)


def test_uneven_heads_and_mlp_columns_match_transformers(make_tiny_model):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(
        "qwen2", hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=100
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[5, 17, 300, 4000], [9, 9, 9, 9, 9, 9, 9, 9, 120], list(range(100, 160))]
    want = hf_greedy(hf, prompts, 12)
    with plait.Engine(path, tp_size=2, chunked_prefill_size=16) as engine:
        got = engine.generate(
            input_ids=prompts, sampling_params={"max_new_tokens": 12, "temperature": 0}
        )
        assert [o["output_ids"] for o in got] == want
        assert engine.get_server_info()["num_running_reqs"] == 0


def test_a_rank_that_fails_to_start_fails_the_engine_with_its_error(
    make_tiny_model, tmp_path, monkeypatch, spawned_children
):
    # sitecustomize runs at interpreter start-up: only the worker processes see it.
    (tmp_path / "sitecustomize.py").write_text(
        "import plait.models.loader as l\n"
        "def broken(*a, **k):\n"
        "    raise OSError('injected: cannot read the shard')\n"
        "l.load_model = broken\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed to start.*injected: cannot read"):
        plait.Engine(make_tiny_model("llama"), tp_size=2)
    assert not spawned_children()


def test_structured_generation_and_frontend_programs_run_unchanged_on_tp2(smollm_dir):
    """Grammar masks, jump-forward and the frontend's gen/select/fork live on rank 0: with
    tp_size=2 they give what tp_size=1 gives."""
    import plait as pl

    @pl.function
    def program(s):
        s += pl.user("Name a color.")
        s += pl.assistant(pl.gen("color", max_tokens=6))
        s += "The opposite of hot is" + pl.select("x", [" cold", " warm"])
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" Number {i}:" + pl.gen("n", max_tokens=3)
        forks.join()

    constrained = {"max_new_tokens": 12, "temperature": 0, "regex": r"[0-9]{1,3}\.[0-9]"}
    results = []
    for tp in (1, 2):
        with plait.Engine(smollm_dir, tp_size=tp) as engine:
            out = engine.generate("The temperature today is ", constrained)
            state = program.run(temperature=0, backend=pl.Runtime(engine))
            assert state.error() is None, state.error()
            results.append((out["text"], state.text()))
    assert results[0] == results[1]
    assert re.fullmatch(constrained["regex"], results[1][0])
