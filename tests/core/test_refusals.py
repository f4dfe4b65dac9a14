"""Every option (or combination of options) the engine refuses at load, refused with a
ValueError whose message starts with the option's name, before anything is started: no rank
process, no model read. The server-side refusals (flags, launchers) are in
tests/server/test_cli.py and tests/server/test_mem_fraction.py."""

from __future__ import annotations

import json
import sys

import pytest

import plait
from plait.core.engine_config import EngineConfig


@pytest.mark.parametrize(
    "options, message",
    [
        ({"page_size": 0}, "page_size must be a positive integer"),
        ({"max_total_tokens": 0}, "max_total_tokens must be a positive integer"),
        ({"chunked_prefill_size": -1}, "chunked_prefill_size must be a positive integer"),
        ({"max_prefill_tokens": 0}, "max_prefill_tokens must be a positive integer"),
        ({"max_running_requests": 0}, "max_running_requests must be a positive integer"),
        ({"context_length": 0}, "context_length must be a positive integer"),
        ({"tp_size": 0}, "tp_size must be a positive integer"),
        ({"dtype": "int8"}, "dtype must be float32, float16 or bfloat16"),
        ({"schedule_policy": "sjf"}, "schedule_policy must be one of"),
        ({"grammar_compile_timeout": 0}, "grammar_compile_timeout must be > 0"),
        ({"quantization": "int3"}, "quantization must be one of"),
        ({"quantization_group_size": 48}, "quantization_group_size must be a multiple of 32"),
        ({"quantization_activations": "int4"}, "quantization_activations must be one of"),
        ({"disaggregation_mode": "both"}, "disaggregation_mode must be one of"),
        (
            {"disaggregation_transfer_backend": "nixl"},
            "disaggregation_transfer_backend must be one of",
        ),
        ({"disaggregation_bootstrap_port": 70000}, "disaggregation_bootstrap_port must be a port"),
        ({"disaggregation_transfer_timeout": 0}, "disaggregation_transfer_timeout must be > 0"),
        ({"kv_cache_memory_gb": 0}, "kv_cache_memory_gb must be > 0"),
        # combinations
        (
            {"quantization": "int8", "tp_size": 2},
            "quantization='int8' does not support tensor parallelism yet",
        ),
        (
            {"quantization": "int4", "tp_size": 4},
            "quantization='int4' does not support tensor parallelism yet",
        ),
        (
            {"model_path": "/models/m.gguf", "tp_size": 2},
            "quantization='gguf' does not support tensor parallelism yet",
        ),
        (
            {"disable_graph_capture": True, "enable_graph_capture": True},
            "disable_graph_capture and enable_graph_capture are both set",
        ),
    ],
)
def test_engine_config_refuses(options, message):
    with pytest.raises(ValueError) as err:
        EngineConfig(**options).validate()
    assert str(err.value).startswith(message), err.value


def test_quantization_with_tp_is_refused_before_any_rank_starts(make_tiny_model, spawned_children):
    with pytest.raises(ValueError, match="^quantization='int8' does not support tensor"):
        plait.Engine(make_tiny_model("llama"), quantization="int8", tp_size=2)
    assert not spawned_children()


def test_the_fake_transfer_with_tp_is_refused_before_any_rank_starts(
    make_tiny_model, spawned_children
):
    with pytest.raises(
        ValueError, match="^disaggregation_transfer_backend='fake' .*tp_size must be 1"
    ):
        plait.Engine(
            make_tiny_model("llama"),
            disaggregation_mode="prefill",
            disaggregation_transfer_backend="fake",
            tp_size=2,
        )
    assert not spawned_children()


def test_a_pool_smaller_than_two_pages_is_refused(make_tiny_model):
    with pytest.raises(
        ValueError,
        match=r"^max_total_tokens: a KV pool of 16 tokens .* "
        r"page_size=16 needs at least two pages",
    ):
        plait.Engine(make_tiny_model("llama"), max_total_tokens=20, page_size=16)


def test_an_architecture_no_plugin_registered_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(
        ValueError,
        match=r"^architecture 'GPT2LMHeadModel' is not supported "
        r"\(model_type 'gpt2'\); registered architectures: "
        r".*'LlamaForCausalLM'",
    ):
        plait.Engine(tmp_path)


def test_the_loader_refuses_quantization_with_tp_too():
    """The second line of defence, for callers that load a model without an EngineConfig."""
    from plait.core.tp.group import TPGroup
    from plait.models.loader import load_model
    from plait.quant import QuantConfig

    with pytest.raises(ValueError, match="^quantization='int8' does not support tp_size > 1"):
        load_model(
            None,
            None,
            None,
            None,
            0,
            TPGroup(rank=0, size=2),
            QuantConfig("int8"),
            matmul=lambda x, w: x,
        )


def test_tensor_parallelism_refuses_a_backend_with_its_own_runner():
    from plait.core.tp.runner import TPModelRunner

    with pytest.raises(ValueError, match="^tensor parallelism needs the core ModelRunner"):
        TPModelRunner(object(), None)


def test_mooncake_transfer_without_mooncake_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)  # import fails
    from plait.disaggregation.transports import create_transfer

    with pytest.raises(
        ValueError, match="^disaggregation_transfer_backend: mooncake is not installed"
    ):
        create_transfer("mooncake", "127.0.0.1")
