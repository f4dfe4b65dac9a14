"""The CPU backend's prepacked Linear layers compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plait.backends.cpu.linear import (
    PackedLinear,
    can_prepack,
    default_layout,
    panel_extension,
    prepack_linears,
)

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="needs a torch built with oneDNN (mkldnn)"
)

LAYOUTS = ["onednn"] + (["panel"] if panel_extension() is not None else [])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 5, 64])
def test_packed_linear_matches_nn_linear(layout, bias, rows):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(rows, 48)
    packed = PackedLinear(lin, layout)
    assert packed.layout == layout
    torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)


def test_the_default_layout_is_panels_for_float32_where_the_kernel_builds():
    assert default_layout(torch.float32) == ("panel" if panel_extension() else "onednn")
    # bfloat16 weights go to the panels as their 16-bit form (computed in float32)
    assert default_layout(torch.bfloat16) == ("panel" if panel_extension() else "onednn")
    assert default_layout(torch.float16) is None


def test_a_layout_that_cannot_hold_the_weight_is_a_value_error():
    with pytest.raises(ValueError, match="layout must be one of"):
        PackedLinear(nn.Linear(8, 8), "mkl")
    with pytest.raises(ValueError, match="layout must be one of"):
        prepack_linears(nn.Sequential(nn.Linear(8, 8)), "blocked")
    with pytest.raises(ValueError, match="layout='panel' needs a float32 or bfloat16 weight"):
        PackedLinear(nn.Linear(8, 8).to(torch.float16), "panel")


def test_prepack_replaces_every_linear_and_keeps_tied_embedding_dense():
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 16),
            "a": nn.Linear(16, 16),
            "inner": nn.Sequential(nn.Linear(16, 16)),
            "head": nn.Linear(16, 10),
        }
    )
    model["head"].weight = model["embed"].weight
    x = torch.randn(3, 16)
    want = model["head"](model["inner"](model["a"](x)))
    assert prepack_linears(model) == 3
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    got = model["head"](model["inner"](model["a"](x)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model["embed"].weight.layout == torch.strided  # the lookup table stays usable


def test_float16_keeps_nn_linear():
    # oneDNN's fp16 linear needs AVX-512-FP16; Plait never packs fp16, on any CPU.
    model = nn.Sequential(nn.Linear(8, 8).half())
    assert not can_prepack(torch.float16)
    assert prepack_linears(model) == 0 and isinstance(model[0], nn.Linear)


def test_tensor_parallel_layers_are_packed_only_on_one_rank():
    from plait.core.tp.group import TPGroup
    from plait.models.parallel_layers import ParallelLMHead, RowParallelLinear

    one = nn.Sequential(
        RowParallelLinear(16, 16, False, TPGroup()), ParallelLMHead(16, 10, TPGroup())
    )
    x = torch.randn(2, 16)
    want = one(x)
    assert prepack_linears(one) == 2
    torch.testing.assert_close(one(x), want, rtol=1e-5, atol=1e-5)
    two = nn.Sequential(RowParallelLinear(16, 16, False, TPGroup()))
    two[0].tp = TPGroup(rank=0, size=2)  # one rank of two: it must all-reduce
    assert prepack_linears(two) == 0 and isinstance(two[0], RowParallelLinear)


@pytest.mark.skipif(panel_extension() is None, reason="needs the AVX-512 panel kernel")
@pytest.mark.parametrize("rows", [1, 3, 9, 16, 17, 40])
def test_a_weight_on_a_4_bit_grid_is_kept_compact_with_the_same_results(rows):
    """Products of up to ``register_decode_rows`` (16) rows read the 4-bit form: the same bits
    as the float32 panels, which the larger ones still read."""
    from tests.backends.test_cpu_panel_gemm import grid_weight

    lin = nn.Linear(96, 100)
    with torch.no_grad():
        lin.weight.copy_(grid_weight(100, 96, 9))
    compact, full = PackedLinear(lin, "panel"), PackedLinear(lin, "panel", compact=False)
    assert compact.compact and not full.compact and full.compact_form() == []
    assert compact.compact_format == "affine4" and "compact=affine4" in repr(compact)
    x = torch.randn(rows, 96)
    assert torch.equal(compact(x), full(x))
    torch.testing.assert_close(compact(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(panel_extension() is None, reason="needs the AVX-512 panel kernel")
def test_a_bfloat16_weight_is_kept_as_halves_and_multiplied_in_float32():
    """``--dtype bfloat16``: the weight's 16-bit form only (no float32 panels), the products
    those of its float32 upcast; a bf16 activation is widened and the result rounded back."""
    lin = nn.Linear(96, 100).to(torch.bfloat16)
    up = nn.Linear(96, 100)
    with torch.no_grad():
        up.weight.copy_(lin.weight.float())
        up.bias.copy_(lin.bias.float())
    packed, ref = PackedLinear(lin), PackedLinear(up, "panel", compact=False)
    assert packed.layout == "panel" and packed.compact_format == "bf16"
    assert not packed.has_panels and packed.codes.dtype == torch.uint16
    x = torch.randn(7, 96)
    assert torch.equal(packed(x), ref(x))
    xb = x.bfloat16()
    assert packed(xb).dtype == torch.bfloat16
    assert torch.equal(packed(xb), ref(xb.float()).bfloat16())


@pytest.mark.skipif(panel_extension() is None, reason="needs the AVX-512 panel kernel")
@pytest.mark.parametrize("rows", [1, 9, 40])
def test_a_weight_upcast_from_bfloat16_is_kept_as_halves_with_the_same_results(rows):
    lin = nn.Linear(96, 100)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.bfloat16().float())
    compact, full = PackedLinear(lin, "panel"), PackedLinear(lin, "panel", compact=False)
    kept = PackedLinear(lin, "panel", keep_panels=True)
    assert compact.compact_format == "bf16" and len(compact.compact_form()) == 1
    # the halves replace the float32 panels unless they are asked for
    assert not compact.has_panels and compact.packed_weight.numel() == 0
    assert full.has_panels and kept.has_panels and kept.compact_format == "bf16"
    x = torch.randn(rows, 96)
    assert torch.equal(compact(x), full(x))
    assert torch.equal(kept(x), full(x))


@pytest.mark.skipif(panel_extension() is None, reason="needs the AVX-512 panel kernel")
def test_prepack_keeps_the_lm_heads_panels_beside_its_16_bit_form():
    """The greedy head reads the LM head's float32 panels; every other 16-bit weight drops
    them, and a 4-bit weight keeps them (products above 16 rows read them)."""
    from tests.backends.test_cpu_panel_gemm import grid_weight

    model = nn.Module()
    model.proj, model.lm_head, model.q4 = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(64, 96)
    with torch.no_grad():
        for lin in (model.proj, model.lm_head):
            lin.weight.copy_(lin.weight.bfloat16().float())
        model.q4.weight.copy_(grid_weight(96, 64, 3))
    x = torch.randn(5, 64)
    want = {name: getattr(model, name)(x) for name in ("proj", "lm_head", "q4")}
    assert prepack_linears(model) == 3
    assert (model.proj.compact_format, model.lm_head.compact_format, model.q4.compact_format) == (
        "bf16",
        "bf16",
        "affine4",
    )
    assert not model.proj.has_panels and model.lm_head.has_panels and model.q4.has_panels
    for name, y in want.items():
        torch.testing.assert_close(getattr(model, name)(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(panel_extension() is None, reason="needs the AVX-512 panel kernel")
def test_an_ordinary_float32_weight_has_no_smaller_form():
    packed = PackedLinear(nn.Linear(64, 64), "panel")
    assert not packed.compact and packed.codes is None and packed.compact_format is None
