"""The panel GEMM (plait/backends/cpu/panel_gemm.h): x @ W^T (+ b) from a weight packed once
into 48-column panels, at each build level the CPU backend compiles here."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from plait.backends.cpu import cpp_build

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler on this machine to build the kernel")

LEVELS = ["portable"] + (["avx512vnni"] if cpp_build.best_level() == "avx512vnni" else [])


@pytest.fixture(params=LEVELS)
def panel(request):
    ext = cpp_build.extension("panel_gemm.cpp", request.param)
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
    torch.testing.assert_close(y, reference(x.reshape(12, 32), w, None).view(3, 4, 60),
                               rtol=1e-5, atol=1e-4)


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
