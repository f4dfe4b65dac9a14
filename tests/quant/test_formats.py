"""The quantized format: GGUF blocks read bit for bit, quantizers within their error bound,
and bad settings refused with the parameter named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.quant import check_method
from plait.quant.formats import (QuantizedWeight, dequantize, pack_int4, quantize_int4,
                                 quantize_int8, unpack_int4)
from plait.quant.gguf import block_weight
from plait.quant.modules import int4_group_for


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_exactly_like_the_gguf_package(kind):
    import gguf
    from gguf import quants
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    raw = quants.quantize(x, qtype)
    w = block_weight(kind, raw, rows=6)
    assert torch.equal(dequantize(w), torch.from_numpy(quants.dequantize(raw, qtype)))
    assert w.nbytes() == raw.nbytes  # blocks kept as they are: no bytes added


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_error_is_within_half_a_step(symmetric, group):
    w = torch.randn(16, 256)
    q = quantize_int4(w, group, symmetric)
    step = q.scales.float().repeat_interleave(group, dim=1)
    assert ((dequantize(q) - w).abs() <= step / 2 + 1e-3 * w.abs() + 1e-6).all()


def test_int8_error_is_within_half_a_step():
    w = torch.randn(16, 96)
    q = quantize_int8(w)
    assert q.group_size == 96 and q.scales.shape == (16, 1)
    assert ((dequantize(q) - w).abs() <= q.scales.float() / 2 + 1e-3 * w.abs()).all()


def test_int4_group_falls_back_to_a_divisor():
    assert int4_group_for(576, 128) == 96
    assert int4_group_for(1536, 128) == 128
    assert int4_group_for(100, 128) is None


def test_inconsistent_weights_are_refused():
    with pytest.raises(ValueError, match="qs must be"):
        QuantizedWeight(4, 32, torch.zeros(2, 32, dtype=torch.uint8),
                        torch.ones(2, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(2, 96), 64)


@pytest.mark.parametrize("bad", ["int3", "fp8", "", "GGUF"])
def test_unknown_quantization_is_a_value_error(bad):
    from plait.core.engine_config import EngineConfig
    with pytest.raises(ValueError, match="quantization must be one of"):
        check_method(bad)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization=bad).validate()


def test_bad_group_size_is_a_value_error():
    from plait.core.engine_config import EngineConfig
    with pytest.raises(ValueError, match="quantization_group_size"):
        EngineConfig(quantization="int4", quantization_group_size=48).validate()


def test_gguf_without_a_gguf_file_is_a_value_error(tmp_path):
    from plait.core.engine_config import EngineConfig
    cfg = EngineConfig(model_path=tmp_path, quantization="gguf")
    with pytest.raises(ValueError, match="needs a .gguf model_path"):
        cfg.quant_config(tmp_path)


def test_gguf_path_implies_gguf_and_none_keeps_the_dequantized_path(tmp_path):
    from plait.core.engine_config import EngineConfig
    f = tmp_path / "m.gguf"
    assert EngineConfig(model_path=f).quant_config(tmp_path).method == "gguf"
    assert EngineConfig(model_path=f, quantization="none").quant_config(tmp_path).method == "none"


def test_serve_flag_refuses_bad_values_and_implies_gguf():
    import argparse
    from plait.server.server_args import ServerArgs, add_engine_args
    p = argparse.ArgumentParser()
    add_engine_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--quantization", "int3"])
    assert p.parse_args(["--quantization", "int8"]).quantization == "int8"
    assert ServerArgs(model_path="x.gguf").engine_kwargs("/dir")["quantization"] == "gguf"
    assert "quantization" not in ServerArgs(model_path="dir").engine_kwargs("/dir")
    assert ServerArgs(quantization="int4").engine_kwargs("/d")["quantization"] == "int4"
