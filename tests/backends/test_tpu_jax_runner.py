"""The TPU backend's JAX model runner on JAX's CPU device (``PLAIT_TPU_PLATFORM=cpu``):
greedy parity with the CPU backend, no torch forward on its path, bounded jit buckets."""

from __future__ import annotations

import numpy as np
import pytest

import plait
from plait.backends import registry
from plait.backends.tpu import pallas_attention, platform, step_inputs
from plait.backends.tpu.graph import CompiledSteps, JitBuckets
from plait.backends.tpu.plugin import TpuBackend
from plait.testing.e2e import greedy_output_ids
from plait.testing.tiny_model import make_tiny_llama
from tests.core.test_engine_parity import GREEDY


@pytest.fixture
def tpu_on_cpu(monkeypatch):
    """The development mode, with the registry's cached availability forgotten around it."""
    monkeypatch.setenv(platform.PLATFORM_ENV, "cpu")
    monkeypatch.delenv(platform.ATTENTION_ENV, raising=False)
    registry.available_backends.cache_clear()
    yield monkeypatch
    registry.available_backends.cache_clear()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


PROMPTS = [
    [1, 42, 71, 78, 78, 81],
    [1, 90, 63],
    [1, 42, 71, 78, 78, 81, 223, 89, 130, 117, 84],
    [1, 5] * 20,
]


# -- the switch -----------------------------------------------------------------------------------


def test_cpu_development_mode_makes_tpu_available(tpu_on_cpu):
    assert TpuBackend.info().available
    assert TpuBackend().jax_device().platform == "cpu"
    assert TpuBackend().attention_impl() == "jax"
    tpu_on_cpu.setenv(platform.ATTENTION_ENV, "pallas")
    assert TpuBackend().attention_impl() == "pallas"


def test_bad_switch_values_are_refused_naming_the_variable(tpu_on_cpu):
    tpu_on_cpu.setenv(platform.PLATFORM_ENV, "gpu")
    assert platform.PLATFORM_ENV in TpuBackend.info().reason
    tpu_on_cpu.setenv(platform.PLATFORM_ENV, "cpu")
    tpu_on_cpu.setenv(platform.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match=platform.ATTENTION_ENV):
        TpuBackend().attention_impl()


# -- parity and the no-torch guarantee ------------------------------------------------------------


@pytest.mark.parametrize("attention", ["jax", "pallas"])
@pytest.mark.parametrize(
    "engine_args",
    [{"page_size": 1, "chunked_prefill_size": 8}, {"page_size": 16}],
    ids=["page1-chunked8", "page16"],
)
def test_tiny_llama_greedy_matches_cpu_backend(tpu_on_cpu, tiny, attention, engine_args):
    tpu_on_cpu.setenv(platform.ATTENTION_ENV, attention)
    want = greedy_output_ids("cpu", tiny, PROMPTS, **engine_args)
    assert greedy_output_ids("tpu", tiny, PROMPTS, **engine_args) == want


def test_no_torch_model_is_built_or_run(tpu_on_cpu, tiny):
    from plait.models import llama, loader

    def refuse(*args, **kwargs):
        raise AssertionError("a torch model ran on the TPU backend's path")

    want = greedy_output_ids("cpu", tiny, PROMPTS)
    for cls in (llama.LlamaForCausalLM, llama.DecoderLayer, llama.Attention, llama.MLP):
        tpu_on_cpu.setattr(cls, "forward", refuse)
    tpu_on_cpu.setattr(loader, "load_model", refuse)
    assert greedy_output_ids("tpu", tiny, PROMPTS) == want


# -- graph capture: bounded buckets ---------------------------------------------------------------


def test_many_batch_sizes_compile_only_the_configured_buckets(tpu_on_cpu, tiny):
    with plait.Engine(tiny, device="tpu", max_running_requests=8, max_total_tokens=4096) as e:
        runner = e.scheduler.runner
        for n in range(1, 9):
            e.generate(
                input_ids=[[1, 7 * n + i] for i in range(n)],
                sampling_params={"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
            )
        decode = [k for k in runner.steps.programs if k[0] == "decode"]
        assert sorted(k[1] for k in decode) == [1, 2, 4, 8]  # 8 batch sizes, 4 programs
        info = e.get_server_info()
        assert info["jit_compiles"] == len(runner.steps.programs) <= info["jit_programs_max"]
        e.generate(
            input_ids=[[1, 99 + i] for i in range(5)],
            sampling_params={"max_new_tokens": 3, "temperature": 0},
        )
        assert e.get_server_info()["jit_compiles"] == info["jit_compiles"]  # replays only


def test_buckets_pad_up_and_refuse_what_they_cannot_hold():
    b = JitBuckets.build(
        max_batch_size=12,
        max_tokens=1000,
        context_len=300,
        batch_sizes=(1, 4, 8, 16),
        min_tokens=16,
        min_kv_width=128,
    )
    assert b.batch_sizes == (1, 4, 8, 12)
    assert [b.batch(n) for n in (1, 2, 5, 9, 12)] == [1, 4, 8, 12, 12]
    assert [b.tokens(n) for n in (1, 17, 1000)] == [16, 32, 1024]
    assert [b.kv_width(n) for n in (1, 129, 300)] == [128, 256, 512]
    for bad in (
        lambda: b.batch(13),
        lambda: b.batch(0),
        lambda: b.tokens(1025),
        lambda: b.kv_width(513),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="max_batch_size"):
        JitBuckets.build(max_batch_size=0, max_tokens=1, context_len=1)
    # 4 batch sizes x 3 widths decode programs + 7 token sizes x 4 x 3 x 2 extend programs
    assert b.max_programs() == 4 * 3 + 7 * 4 * 3 * 2


def test_compiled_steps_compile_each_key_once():
    import jax
    import jax.numpy as jnp

    made = []

    def make(key):
        made.append(key)
        return jax.jit(lambda x: x * 2), (jnp.zeros(key[0], jnp.float32),)

    steps = CompiledSteps(make)
    for n in (4, 8, 4, 4, 8):
        assert float(steps.get((n,))(jnp.ones(n, jnp.float32)).sum()) == 2 * n
    assert steps.compiles == 2 and made == [(4,), (8,)]


def test_extend_tiles_cover_every_token_once():
    assert step_inputs.Q_TILE == pallas_attention.Q_TILE
    tiles = step_inputs.extend_tiles([0, 5], [20, 3], num_tiles=6, tokens=32)
    rows = tiles["q_index"].reshape(-1)[tiles["out_index"][:23]]
    assert rows.tolist() == list(range(23))  # token t sits at out_index[t] in the tiles
    assert tiles["tile_req"][:3].tolist() == [0, 0, 1]
    assert tiles["tile_pos0"].tolist() == [0, 16, 5, -16, -16, -16]
    with pytest.raises(ValueError, match="num_tiles"):
        step_inputs.extend_tiles([0], [40], num_tiles=2, tokens=64)


def test_slot_table_zeroes_past_each_sequence():
    r2t = np.arange(40, dtype=np.int32).reshape(4, 10) + 1
    table = step_inputs.slot_table(r2t, [2, 0], [3, 1], batch=4, width=8)
    assert table.tolist()[:2] == [[21, 22, 23, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert not table[2:].any()


# -- SmolLM2: the engine parity prompts (slow) ----------------------------------------------------


@pytest.mark.slow
def test_smollm_batch_chunked_then_cache_hits_match_transformers(
    tpu_on_cpu, smollm_dir, prompt_ids, expected
):
    """One SmolLM2 engine (each start compiles its programs: ~20 s): a batch chunked at 64
    whose later prompts hit a prefix cached mid-batch, then every prompt again from the
    cache. Page size 16 is checked on the tiny model against the CPU backend
    (test_tiny_llama_greedy_matches_cpu_backend), whose own page-16 SmolLM2 parity is
    tests/core/test_engine_parity.py's."""
    with plait.Engine(
        smollm_dir, device="tpu", dtype="float32", page_size=1, chunked_prefill_size=64
    ) as engine:
        # warm the cache with the shared prefix so later prompts hit it mid-batch
        engine.generate(input_ids=prompt_ids[4][:40], sampling_params={"max_new_tokens": 0})
        first = engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)
        assert [o["output_ids"] for o in first] == expected
        assert any(o["meta_info"]["cached_tokens"] > 0 for o in first)
        again = engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert all(
            o["meta_info"]["cached_tokens"] == len(ids) - 1 for o, ids in zip(again, prompt_ids)
        )


@pytest.mark.parametrize("attention", ["jax", pytest.param("pallas", marks=pytest.mark.slow)])
def test_sliding_window_greedy_matches_transformers(tpu_on_cpu, make_tiny_model, attention):
    """The JAX model with each attention on a Mistral whose window is far shorter than its
    prompts and generations: transformers' tokens, batched, chunked and after cache hits."""
    from tests.models.test_sliding_window import (
        expected_past_the_window,
        generate_twice,
        windowed_mistral,
    )

    tpu_on_cpu.setenv(platform.ATTENTION_ENV, attention)
    path = windowed_mistral(make_tiny_model)
    want = expected_past_the_window(path)
    with plait.Engine(
        path, device="tpu", dtype="float32", max_total_tokens=2048, chunked_prefill_size=16
    ) as engine:
        assert engine.scheduler.runner.shape.sliding_windows == (8, 8)
        assert generate_twice(engine) == want
