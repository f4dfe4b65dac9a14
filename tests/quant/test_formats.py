"""The quantized format: GGUF blocks read bit for bit, quantizers within their error bound,
and bad settings refused with the parameter named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.quant import check_method
from plait.quant.formats import (
    QuantizedWeight,
    dequantize,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
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


def quantize(fmt: str, w: torch.Tensor, **kw) -> QuantizedWeight:
    if fmt == "int8":
        return quantize_int8(w, **kw)
    return quantize_int4(w, 32, symmetric=fmt == "int4-sym", **kw)


def grid(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Every value a weight of row r / group g can take, ``[N, groups, levels]``, and the
    weight's per-element index into it (its group)."""
    codes = torch.arange(-127, 128) if q.bits == 8 else torch.arange(16.0)
    if q.bits == 4 and q.mins is None:
        codes = codes - 8
    levels = codes.float() * q.scales.float()[..., None]
    if q.mins is not None:
        levels = levels + q.mins.float()[..., None]
    return levels, torch.arange(q.shape[1]) // q.group_size


FMTS = ["int8", "int4-asym", "int4-sym"]


@pytest.mark.parametrize("fmt", FMTS)
def test_codes_are_the_nearest_level_of_the_stored_scales(fmt):
    """Whatever scale the search picks, each code rounds to the nearest value that scale (and
    min) can represent, so no weight is worse off than round-to-nearest on that grid."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((16, 256))
    q = quantize(fmt, w)
    levels, group = grid(q)
    nearest = (w[..., None] - levels[:, group]).abs().amin(-1)
    assert ((dequantize(q) - w).abs() <= nearest + 1e-6 * (1 + w.abs())).all()


@pytest.mark.parametrize("fmt", FMTS)
def test_scale_search_lowers_weight_error_below_absmax_rounding(fmt):
    """Heavy-tailed weights (outliers stretch the absmax grid): the search's error is never
    above plain round-to-nearest on the absmax / min-max grid, and lower overall."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256))
    err = lambda q: (dequantize(q) - w).pow(2).view(64, -1, q.group_size).sum(-1)  # noqa: E731
    searched = err(quantize(fmt, w))
    g = 256 if fmt == "int8" else 32
    rows = w.view(64, -1, g)
    if fmt == "int8":  # textbook per-channel: absmax / 127
        d = (rows.abs().amax(-1, True) / 127).half().float()
        plain = rows - torch.round(rows / d) * d
    elif fmt == "int4-asym":  # min-max onto 0..15
        lo, hi = rows.amin(-1, True).half().float(), rows.amax(-1, True)
        d = ((hi - lo) / 15).half().float()
        plain = rows - (torch.round((rows - lo) / d).clamp(0, 15) * d + lo)
    else:  # absmax / 7 onto -7..7
        d = (rows.abs().amax(-1, True) / 7).half().float()
        plain = rows - torch.round(rows / d).clamp(-8, 7) * d
    plain = plain.pow(2).sum(-1)
    assert (searched <= plain * (1 + 1e-4) + 1e-7).all()
    assert searched.sum() < {"int8": 0.999, "int4-asym": 0.9, "int4-sym": 0.9}[fmt] * plain.sum()


def test_int4_asymmetric_recovers_weights_already_on_its_grid():
    """A float model dequantized from GGUF Q4_1 (the test model is one) holds weights that are
    exactly ``q * scale + min`` per 32-block: groups of 32 get them back with no error."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 128), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every block spans its whole range, as Q4_1's do
    orig = QuantizedWeight(
        4,
        32,
        pack_int4(codes),
        (torch.rand(8, 4, generator=g) / 10 + 0.01).half(),
        (-torch.rand(8, 4, generator=g)).half(),
    )
    w = dequantize(orig)
    assert torch.equal(dequantize(quantize_int4(w, 32)), w)


def test_int8_is_per_channel():
    q = quantize_int8(torch.randn(16, 96))
    assert q.group_size == 96 and q.scales.shape == (16, 1)


def test_all_zero_rows_quantize_to_zero():
    for q in (
        quantize_int8(torch.zeros(2, 64)),
        quantize_int4(torch.zeros(2, 64), 32),
        quantize_int4(torch.zeros(2, 64), 32, symmetric=True),
    ):
        assert torch.equal(dequantize(q), torch.zeros(2, 64))


def test_int4_group_falls_back_to_a_divisor():
    assert int4_group_for(576, 128) == 96
    assert int4_group_for(1536, 128) == 128
    assert int4_group_for(100, 128) is None


def test_inconsistent_weights_are_refused():
    with pytest.raises(ValueError, match="qs must be"):
        QuantizedWeight(
            4, 32, torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 1, dtype=torch.float16)
        )
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
    from plait.server.cli_flags import add_engine_args
    from plait.server.server_args import ServerArgs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--quantization", "int3"])
    assert p.parse_args(["--quantization", "int8"]).quantization == "int8"
    assert ServerArgs(model_path="x.gguf").engine_kwargs("/dir")["quantization"] == "gguf"
    assert "quantization" not in ServerArgs(model_path="dir").engine_kwargs("/dir")
    assert ServerArgs(quantization="int4").engine_kwargs("/d")["quantization"] == "int4"
