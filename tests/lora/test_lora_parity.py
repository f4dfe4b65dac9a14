"""Greedy output under each LoRA adapter equals transformers + peft on the same adapter, token
for token in float32: in batches mixing adapters and the base model, after a prefix-cache hit,
with chunked prefill, after an adapter was evicted from its slot and loaded again, and with
the adapter loaded at run time. The prefix cache never crosses adapters."""

from __future__ import annotations

import pytest

import plait
from tests.lora.conftest import GREEDY, PROMPTS, lora_paths


def run(engine, names):
    """PROMPTS[i] under names[i]; the greedy output ids and cached-token counts."""
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, lora_path=names)
    return [o["output_ids"] for o in outs], [o["meta_info"]["cached_tokens"] for o in outs]


def want(expected, names):
    return [expected[n][i] for i, n in enumerate(names)]


@pytest.fixture(scope="module")
def engine(lora_setup):
    base_dir, dirs, _ = lora_setup
    # two slots for three adapters: every third adapter evicts one
    with plait.Engine(base_dir, lora_paths=lora_paths(dirs), max_loras_per_batch=2) as e:
        yield e


def test_mixed_batch_then_cache_hits_match_peft(engine, lora_setup):
    expected = lora_setup[2]
    engine.flush_cache()
    names = ["qv4", None, "all8", "qv4"]
    got, _ = run(engine, names)
    assert got == want(expected, names)
    got, cached = run(engine, names)  # every prompt now a cache hit in its own namespace
    assert got == want(expected, names)
    assert cached == [len(p) - 1 for p in PROMPTS]


def test_same_prompt_under_two_adapters_is_computed_twice(engine, lora_setup):
    expected = lora_setup[2]
    engine.flush_cache()
    ids = PROMPTS[3]
    sp = GREEDY
    seen = []
    for name in ("qv4", "all8", None, "qv4"):
        out = engine.generate(input_ids=ids, sampling_params=sp, lora_path=name)
        assert out["output_ids"] == expected[name][3]
        seen.append(out["meta_info"]["cached_tokens"])
    # computed under qv4, again under all8, again for the base model; qv4's own KV is reused
    assert seen == [0, 0, 0, len(ids) - 1]


def test_evicted_adapter_reloads_and_still_matches(engine, lora_setup):
    expected = lora_setup[2]
    loads = engine.get_server_info()["lora_slot_loads"]
    for names in (["qv4", "all8", None, None], ["mlp6", None, "mlp6", "all8"], ["qv4"] * 4):
        engine.flush_cache()
        got, _ = run(engine, names)
        assert got == want(expected, names)
    info = engine.get_server_info()
    assert info["lora_slot_loads"] - loads >= 2  # mlp6 evicted one; qv4 came back over another
    assert len(info["lora_resident"]) <= 2


def test_three_adapters_with_two_slots_share_the_queue(engine, lora_setup):
    """More distinct adapters than slots in one call: they run in turns, each still exact."""
    expected = lora_setup[2]
    engine.flush_cache()
    names = ["qv4", "all8", "mlp6", None]
    got, _ = run(engine, names)
    assert got == want(expected, names)


def test_chunked_prefill_matches_peft(lora_setup):
    base_dir, dirs, expected = lora_setup
    names = ["all8", "mlp6", None, "all8"]
    with plait.Engine(
        base_dir, lora_paths=lora_paths(dirs), chunked_prefill_size=8, max_loras_per_batch=3
    ) as e:
        got, _ = run(e, names)
    assert got == want(expected, names)


def test_adapter_loaded_at_run_time_then_unloaded(lora_setup):
    base_dir, dirs, expected = lora_setup
    with plait.Engine(base_dir, max_lora_rank=8, max_loras_per_batch=2) as e:
        with pytest.raises(ValueError, match="lora_path 'all8'"):
            e.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, lora_path="all8")
        e.load_lora_adapter("all8", str(dirs["all8"]))
        assert e.lora_adapters() == ["all8"]
        got, _ = run(e, ["all8", None, "all8", None])
        assert got == want(expected, ["all8", None, "all8", None])
        e.unload_lora_adapter("all8")
        with pytest.raises(ValueError, match="lora_path 'all8'"):
            e.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, lora_path="all8")
        # the same name, other weights: the old adapter's cached prefix is not reused
        e.load_lora_adapter("all8", str(dirs["mlp6"]))
        out = e.generate(input_ids=PROMPTS[0], sampling_params=GREEDY, lora_path="all8")
        assert out["output_ids"] == expected["mlp6"][0]
        assert out["meta_info"]["cached_tokens"] == 0


def test_quantized_base_with_adapter_matches_peft_on_the_dequantized_base(lora_setup):
    """int8 base weights, the adapters in float32: the greedy tokens equal peft's on a base
    whose projections are the engine's dequantized int8 weights (quantized row by row, so
    the fused qkv/gate_up rows quantize as the separate ones do)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from plait.quant.formats import dequantize, quantize_int8
    from tests.conftest import hf_greedy
    from tests.lora.conftest import NEW

    base_dir, dirs, _ = lora_setup
    names = ["all8", "qv4", None, "mlp6"]
    want_q = []
    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in [*layer.self_attn.children(), *layer.mlp.children()]:
                    if isinstance(lin, torch.nn.Linear):
                        lin.weight.copy_(dequantize(quantize_int8(lin.weight)))
        if name is not None:
            model = PeftModel.from_pretrained(model, dirs[name]).eval()
        want_q.append(hf_greedy(model, [PROMPTS[i]], NEW)[0])
    with plait.Engine(
        base_dir, lora_paths=lora_paths(dirs), quantization="int8", max_loras_per_batch=3
    ) as e:
        got, _ = run(e, names)
    assert got == want_q


def test_adapter_batches_run_in_the_native_step(engine, lora_setup):
    """On the CPU the native C++ step carries the adapters: a mixed batch never falls back to
    the eager layers, and still equals peft (before, any adapter batch ran eagerly)."""
    model = engine.scheduler.runner.model
    if model.decode_forward is None:
        pytest.skip("the CPU native step is not built on this machine")
    assert engine.get_server_info()["lora_native_step"] is True
    expected = lora_setup[2]

    def eager(*_args, **_kwargs):
        raise AssertionError("an adapter batch ran the eager layers")

    engine.flush_cache()
    model.layers_forward = eager
    try:
        names = ["all8", None, "qv4", "all8"]
        got, _ = run(engine, names)
        got_hit, _ = run(engine, names)
    finally:
        del model.layers_forward
    assert got == want(expected, names) and got_hit == got
