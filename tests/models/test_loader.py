"""Model loading: directories, GGUF conversion cache, fused weights, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from plait.models import loader
from plait.models.default import GGUF_MEMBER


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        loader.resolve_model_dir(tmp_path)


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="model_path"):
        loader.resolve_model_dir(tmp_path / "nope")


def test_an_unregistered_architecture_is_rejected_naming_the_registered_ones(tmp_path):
    from plait.models import registry

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(
        ValueError, match="(?s)'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"
    ):
        registry.loader_for(loader.load_config(tmp_path))


def test_gguf_conversion_is_reused(tmp_path, monkeypatch):
    """The second load of a GGUF file reads the safetensors cache and never converts again."""
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    target = loader.cache_dir() / "model"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(loader, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert loader.resolve_model_dir(gguf) == target


def test_fused_weights_equal_the_checkpoint(make_tiny_model):
    from safetensors.torch import load_file

    path = make_tiny_model("qwen2")
    config = loader.load_config(path)
    model = loader.load_model(path, config, torch.float32, torch.device("cpu"), 128)
    state = load_file(str(path / "model.safetensors"))
    attn = model.layers[1].self_attn
    q = state["model.layers.1.self_attn.q_proj.weight"]
    v = state["model.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(attn.qkv_proj.weight[: q.shape[0]], q)
    assert torch.equal(attn.qkv_proj.weight[-v.shape[0] :], v)
    assert torch.equal(
        attn.qkv_proj.bias[-v.shape[0] :], state["model.layers.1.self_attn.v_proj.bias"]
    )
    up = state["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(model.layers[1].mlp.gate_up_proj.weight[-up.shape[0] :], up)


def test_checkpoint_missing_weights_is_rejected(make_tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny_model("llama")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks weights"):
        loader.load_model(
            tmp_path, loader.load_config(tmp_path), torch.float32, torch.device("cpu"), 128
        )


@pytest.mark.slow
def test_real_gguf_converts_to_the_same_weights_as_the_default_model(
    smollm_dir, tmp_path, monkeypatch
):
    gguf = loader.cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip("the default model was provided as a directory, not fetched as GGUF")
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    converted = loader.resolve_model_dir(gguf)
    monkeypatch.setattr(loader, "convert_gguf", lambda *a: pytest.fail("converted again"))
    assert loader.resolve_model_dir(gguf) == converted
    from safetensors.torch import load_file

    a = load_file(str(converted / "model.safetensors"))
    b = load_file(str(smollm_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert GGUF_MEMBER.endswith(gguf.name)
