"""The CPU backend's decode capture: off by default, forced by the flags, and (slow: it
compiles) token-identical to eager and to transformers on the parity prompts."""

from __future__ import annotations

import pytest

import plait
from plait.backends.cpu.plugin import CpuBackend
from plait.backends.cuda.plugin import CudaBackend
from plait.core.engine_config import EngineConfig
from tests.core.test_engine_parity import GREEDY, run_batch


def test_graph_capture_follows_flags_then_the_backend_default():
    assert EngineConfig().graph_capture(CpuBackend()) is False
    assert EngineConfig(enable_graph_capture=True).graph_capture(CpuBackend()) is True
    assert EngineConfig().graph_capture(CudaBackend()) is True
    assert EngineConfig(disable_graph_capture=True).graph_capture(CudaBackend()) is False


def test_both_graph_capture_flags_are_refused():
    with pytest.raises(ValueError, match="disable_graph_capture"):
        EngineConfig(disable_graph_capture=True, enable_graph_capture=True).validate()


def test_cpu_default_runs_decode_eagerly(make_tiny_model):
    with plait.Engine(make_tiny_model("llama"), max_total_tokens=512) as engine:
        info = engine.get_server_info()
        assert info["graph_capture"] is False and "graph_compiles" not in info


@pytest.mark.slow
@pytest.mark.timeout(3600)  # compiling takes minutes on 2 shared cores
def test_compiled_decode_matches_eager_and_transformers(smollm_dir, prompt_ids, expected):
    # Batched, then every prompt again from the prefix cache, with chunked prefill: the
    # compiled decode must not change a single greedy token.
    with plait.Engine(smollm_dir, enable_graph_capture=True, chunked_prefill_size=64) as engine:
        warm = engine.get_server_info()
        assert warm["graph_capture"] is True and warm["graph_compiles"] >= 1
        assert run_batch(engine, prompt_ids) == expected
        again = engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert any(o["meta_info"]["cached_tokens"] > 0 for o in again)
        # sizes and KV lengths varied every step: no recompile per step (the warm-up compiled
        # batch 1 and the masked batch>1 graph; one more is tolerated, not one per step)
        assert engine.get_server_info()["graph_compiles"] <= warm["graph_compiles"] + 1
    # The eager engine's tokens on the same prompts equal ``expected`` too: that is
    # test_engine_parity.py's test_one_batch_then_cache_hits_match_transformers (the CPU runs
    # decode eagerly by default, test_cpu_default_runs_decode_eagerly), not started again here.


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compiled_decode_runs_quantized_layers(smollm_dir, prompt_ids):
    """The GGUF file's quantized layers inside the compiled decode: the kernel is the
    ``plait::quantized_matmul`` custom op there (a pybind call would break the graph), and the
    greedy tokens equal the eager quantized model's."""
    with plait.Engine(smollm_dir, quantization="gguf", disable_graph_capture=True) as eager:
        want = run_batch(eager, prompt_ids)
    with plait.Engine(smollm_dir, quantization="gguf", enable_graph_capture=True) as engine:
        assert engine.get_server_info()["graph_compiles"] >= 1
        assert run_batch(engine, prompt_ids) == want
