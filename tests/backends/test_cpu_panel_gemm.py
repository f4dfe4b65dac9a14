"""The panel GEMM (plait/backends/cpu/panel_gemm.h): x @ W^T (+ b) from a weight packed once
into 48-column panels, at each build level the CPU backend compiles here."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from plait.backends.cpu import cpp_build

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="no C++ compiler on this machine to build the kernel",
)

LEVELS = [
    pytest.param(level, marks=pytest.mark.cpu_kernel_level(level))
    for level in ["portable"] + (["avx512vnni"] if cpp_build.best_level() == "avx512vnni" else [])
]


@pytest.fixture(params=LEVELS)
def panel(request):
    ext = cpp_build.extension(request.param).panel_gemm
    assert ext.has_simd_kernel() == (request.param == "avx512vnni")
    return ext


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return (y if b is None else y + b.double()).float()


# N past a whole panel (49 = 48 + 1), below one (5), several (96, 100); rows within one
# 8-row pass, across passes (9, 17) and across the 512-row chunks (1030)
@pytest.mark.parametrize("n,k", [(5, 7), (49, 16), (96, 64), (100, 33)])
@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 17, 1030])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_matches_the_float64_product(panel, n, k, rows, bias):
    g = torch.Generator().manual_seed(n * 1000 + k + rows)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    packed = panel.pack(w)
    assert packed.shape == ((n + 47) // 48, k, 48)
    y = panel.linear(x, packed, n, b)
    assert y.shape == (rows, n)
    torch.testing.assert_close(y, reference(x, w, b), rtol=1e-5, atol=1e-4)


def test_a_row_is_the_same_whatever_else_is_in_the_batch(panel):
    """Greedy parity at any batch composition needs a row's product not to depend on the rows
    beside it: it is summed in k order whether it shares an 8-row pass or not."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(150, 96, generator=g)
    x = torch.randn(21, 96, generator=g)
    packed = panel.pack(w)
    whole = panel.linear(x, packed, 150)
    for lo, hi in [(0, 1), (3, 4), (5, 13), (8, 21), (20, 21)]:
        assert torch.equal(panel.linear(x[lo:hi], packed, 150), whole[lo:hi])


def test_leading_dims_and_strided_input(panel):
    w = torch.randn(60, 32)
    x = torch.randn(3, 4, 64)[..., ::2]  # not contiguous
    y = panel.linear(x, panel.pack(w), 60)
    assert y.shape == (3, 4, 60)
    torch.testing.assert_close(
        y, reference(x.reshape(12, 32), w, None).view(3, 4, 60), rtol=1e-5, atol=1e-4
    )


def test_bad_input_is_an_error_naming_what_is_wrong(panel):
    w = torch.randn(60, 32)
    packed = panel.pack(w)
    with pytest.raises(RuntimeError, match="last dim 31"):
        panel.linear(torch.randn(2, 31), packed, 60)
    with pytest.raises(RuntimeError, match="N=97"):
        panel.linear(torch.randn(2, 32), packed, 97)
    with pytest.raises(RuntimeError, match="float32"):
        panel.linear(torch.randn(2, 32, dtype=torch.float64), packed, 60)
    with pytest.raises(RuntimeError, match="panel_gemm.pack"):
        panel.linear(torch.randn(2, 32), w, 60)
    with pytest.raises(RuntimeError, match="float32"):
        panel.pack(w.half())


def grid_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """A weight as a GGUF Q4_1 checkpoint converted to float32 holds: in each 32-input block
    of a row, q * d + m with q in 0..15 and d, m float16 (q * d is exact in float32, so the
    sum rounds once, as the kernel's fused multiply-add does)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g).float()
    d = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(n, k // 32, generator=g) * 0.08).half().float()
    return q * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)


# K of one block and of several; N below, at and past a panel; rows decoded in registers
# (1-16: all three column groups at once up to 4, one group a task from 5) and from a scratch
# panel (17 on, 600 across chunks)
@pytest.mark.parametrize("n,k", [(5, 32), (48, 64), (100, 96)])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 9, 16, 17, 600])
@pytest.mark.parametrize("bias", [False, True])
def test_the_4_bit_form_gives_the_float32_panels_bits(panel, n, k, rows, bias):
    w = grid_weight(n, k, n + k)
    packed = panel.pack(w)
    form = panel.encode_affine4(packed)
    assert [t.shape for t in form] == [
        ((n + 47) // 48, k // 2, 48),
        ((n + 47) // 48, k // 32, 48),
        ((n + 47) // 48, k // 32, 48),
    ]
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    assert torch.equal(panel.linear_affine4(x, *form, n, b), panel.linear(x, packed, n, b))


def test_the_4_bit_form_decodes_every_weight_exactly(panel):
    """x = identity rows read the weights back: each decoded float32 is the packed one, bit for
    bit (constant blocks, where d is 0, and -0.0 never produced included)."""
    w = grid_weight(60, 64, 3)
    w[7, :32] = 0.125  # a constant block
    form = panel.encode_affine4(panel.pack(w))
    assert form
    eye = torch.eye(64)
    for lo, hi in [(0, 4), (4, 12), (0, 64)]:
        got = panel.linear_affine4(eye[lo:hi], *form, 60)
        assert torch.equal(got.view(torch.int32), w.T[lo:hi].contiguous().view(torch.int32))


@pytest.mark.parametrize(
    "spoil", ["ulp", "random", "nan", "inf", "k_not_whole_blocks", "negative_zero"]
)
def test_a_weight_off_its_grid_has_no_4_bit_form(panel, spoil):
    """One value the codes cannot give back exactly, and the weight keeps its float32 panels."""
    w = grid_weight(50, 64, 5)
    if spoil == "ulp":
        w[3, 17] = torch.nextafter(w[3, 17], torch.tensor(1.0))
    elif spoil == "random":
        w = torch.randn(50, 64)
    elif spoil == "nan":
        w[10, 40] = float("nan")
    elif spoil == "inf":
        w[10, 40] = float("inf")
    elif spoil == "k_not_whole_blocks":
        w = w[:, :48].contiguous()
    else:  # a block of zeros but one -0.0: q * d + m cannot give both signs
        w[2, :32] = 0.0
        w[2, 5] = -0.0
    assert panel.encode_affine4(panel.pack(w)) == []


def test_bad_4_bit_input_is_an_error_naming_what_is_wrong(panel):
    form = panel.encode_affine4(panel.pack(grid_weight(50, 64, 6)))
    with pytest.raises(RuntimeError, match="x's last dim 32 != the weight's K=64"):
        panel.linear_affine4(torch.randn(2, 32), *form, 50)
    with pytest.raises(RuntimeError, match="N=200 does not match 2 panels"):
        panel.linear_affine4(torch.randn(2, 64), *form, 200)
    with pytest.raises(RuntimeError, match="codes must come from encode_affine4"):
        panel.linear_affine4(torch.randn(2, 64), form[0].float(), form[1], form[2], 50)
    with pytest.raises(RuntimeError, match="scales and offsets must come from encode_affine4"):
        panel.linear_affine4(torch.randn(2, 64), form[0], form[1][:, :1], form[2], 50)


@pytest.mark.parametrize("n,k", [(5, 7), (100, 96)])
@pytest.mark.parametrize("rows", [1, 8, 9, 600])
def test_the_16_bit_form_gives_the_float32_panels_bits(panel, n, k, rows):
    """A weight upcast from bfloat16 is kept as its high halves, read back exactly."""
    g = torch.Generator().manual_seed(n + rows)
    w = torch.randn(n, k, generator=g).bfloat16().float()
    packed = panel.pack(w)
    (halves,) = panel.encode_bf16(packed)
    assert halves.dtype == torch.uint16 and halves.shape == packed.shape
    x = torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g)
    assert torch.equal(panel.linear_bf16(x, halves, n, b), panel.linear(x, packed, n, b))


def test_a_weight_with_a_low_half_has_no_16_bit_form(panel):
    w = torch.randn(50, 64).bfloat16().float()
    w[3, 9] = torch.nextafter(w[3, 9], torch.tensor(1.0))
    assert panel.encode_bf16(panel.pack(w)) == []
    with pytest.raises(RuntimeError, match="halves must come from encode_bf16"):
        panel.linear_bf16(torch.randn(2, 64), panel.pack(w), 50)


def weight_in_form(panel, form: str, n: int, k: int):
    """A weight [n, k] whose panels have `form` (float32 panels, the 16-bit or the 4-bit form),
    and the product that reads that form."""
    if form == "affine4":
        w = grid_weight(n, k, 9)
        codes = panel.encode_affine4(panel.pack(w))
        assert codes
        return w, lambda x: panel.linear_affine4(x, *codes, n, None)
    g = torch.Generator().manual_seed(8)
    w = torch.randn(n, k, generator=g)
    if form == "bf16":
        w = w.bfloat16().float()
    packed = panel.pack(w)
    if form == "bf16":
        (halves,) = panel.encode_bf16(packed)
        return w, lambda x: panel.linear_bf16(x, halves, n, None)
    return w, lambda x: panel.linear(x, packed, n)


@pytest.mark.parametrize("form", ["float32", "bf16", "affine4"])
def test_every_row_count_up_to_33_in_each_form(panel, form):
    """Rows past the first 8 go in passes of near-equal height (17: 8 + 5 + 4), a 16-bit panel
    widened by the first pass for the others: at every M from 1 to 33 (one pass, several, every
    remainder) each row is the float64 product's and, bit for bit, the row computed alone."""
    n, k = 100, 64  # three panels, the last one partial
    w, product = weight_in_form(panel, form, n, k)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(33, k, generator=g)
    alone = torch.cat([product(x[m : m + 1]) for m in range(33)])
    torch.testing.assert_close(alone, reference(x, w, None), rtol=1e-5, atol=1e-4)
    for m in range(1, 34):
        y = product(x[:m])
        assert torch.equal(y, alone[:m]), f"M={m}: rows differ from the rows computed alone"
