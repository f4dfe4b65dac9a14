"""What LoRA serving refuses, each a ValueError naming the setting or the adapter."""

from __future__ import annotations

import json

import pytest

import plait
from plait.core.engine_config import EngineConfig
from tests.lora.conftest import PROMPTS, lora_paths


def test_lora_path_without_adapters_names_it(make_tiny_model):
    with plait.Engine(make_tiny_model("llama")) as e:
        with pytest.raises(ValueError, match="lora_path 'x'"):
            e.generate(input_ids=[1, 2], lora_path="x")
        with pytest.raises(ValueError, match="lora_name"):
            e.load_lora_adapter("x", "/nowhere")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tp_size": 2}, "tensor parallelism"),
        ({"disaggregation_mode": "prefill"}, "disaggregation"),
        ({"max_loras_per_batch": 0}, "max_loras_per_batch"),
        ({"lora_target_modules": ["lm_head"]}, "lora_target_modules"),
        ({"lora_paths": ["a=/x", "a=/y"]}, "given twice"),
    ],
)
def test_config_refusals(kwargs, match):
    cfg = EngineConfig(**{"max_lora_rank": 8, **kwargs})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_adapter_refusals(lora_setup, tmp_path):
    base_dir, dirs, _ = lora_setup
    with pytest.raises(ValueError, match="max_lora_rank=4"):
        plait.Engine(base_dir, lora_paths=lora_paths(dirs), max_lora_rank=4)
    with pytest.raises(ValueError, match="lora_target_modules"):
        plait.Engine(base_dir, lora_paths=lora_paths(dirs), lora_target_modules=["q_proj"])
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((dirs["qv4"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (dirs["qv4"] / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="use_dora"):
        plait.Engine(base_dir, lora_paths=[f"d={dora}"])


def test_unload_refused_while_a_request_uses_it(lora_setup):
    base_dir, dirs, _ = lora_setup
    with plait.Engine(base_dir, lora_paths=lora_paths(dirs)) as e:
        stream = e.generate(
            input_ids=PROMPTS[0],
            sampling_params={"max_new_tokens": 200, "temperature": 0, "ignore_eos": True},
            lora_path="qv4",
            stream=True,
        )
        next(stream)  # the first output: running now, holding its adapter
        with pytest.raises(ValueError, match="lora_name 'qv4' has requests in flight"):
            e.unload_lora_adapter("qv4")
        for _ in stream:
            pass
        e.unload_lora_adapter("qv4")
        assert "qv4" not in e.lora_adapters()
