"""Every quantized matmul equals dequantize-then-matmul for every format, group size and odd
shape: within float rounding for the float-activation kernels (the CPU kernel's AVX2 and
portable builds alike), within the activations' rounding bound for the int8-activation
(AVX-512 VNNI) kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.quant.formats import QuantizedWeight, dequantize, quantize_activations
from plait.quant.modules import torch_quantized_matmul
from plait.testing.cases import QuantCase, quant_weight

FORMATS = ["int8", "int4-asym", "int4-sym"]


#: this file's format names -> the conformance kit's (plait.testing.cases.QUANT_FORMATS)
KIT_FORMATS = {"int8": "int8", "int4-asym": "q4_1", "int4-sym": "q4_0", "q8_0": "q8_0"}


def make_weight(fmt: str, n: int, k: int, group: int, seed: int) -> QuantizedWeight:
    """The kit's weight for ``fmt``; ``q8_0`` always in GGUF's groups of 32."""
    return quant_weight(QuantCase(KIT_FORMATS[fmt], 0, n, k, 32 if fmt == "q8_0" else group, seed))


def assert_matches_reference(matmul, x: torch.Tensor, w: QuantizedWeight) -> None:
    dense = dequantize(w).double()
    ref = x.double() @ dense.T
    # float32 accumulation in any order: bounded by eps * sum |x_k w_k| per output
    bound = 1e-5 * (x.double().abs() @ dense.abs().T) + 1e-6
    got = matmul(x, w)
    assert got.shape == ref.shape and got.dtype == x.dtype
    assert ((got.double() - ref).abs() <= bound).all()


@pytest.fixture(scope="module")
def cpu_matmul():
    """The float-activation kernel (the best SIMD level this CPU runs)."""
    from plait.backends.cpu.qmatmul import CpuQuantizedMatmul

    return CpuQuantizedMatmul()


def vnni_extension():
    from plait.backends.cpu.cpp_build import has_avx512_vnni
    from plait.backends.cpu.qmatmul import extension

    if not has_avx512_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (the int8-activation kernel is not built)")
    return extension("avx512vnni")


# up to 80 blocks: the int8-activation kernel converts 16 groups of scales at a time, the float
# kernel 64 blocks
shapes = st.tuples(
    st.integers(1, 19),
    st.integers(1, 37),
    st.integers(1, 80),
    st.sampled_from(FORMATS + ["q8_0"]),
    st.sampled_from([32, 64, 128]),
    st.integers(0, 2**16),
)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_cpu_kernel_matches_dequantized_reference(cpu_matmul, shape):
    m, n, blocks, fmt, group, seed = shape
    k = 32 * blocks
    if fmt.startswith("int4") and k % group:
        group = 32
    w = make_weight(fmt, n, k, group, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    assert_matches_reference(cpu_matmul, x, w)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 20),
    st.integers(2, 9),
    st.sampled_from(FORMATS + ["q8_0"]),
    st.integers(0, 2**16),
)
def test_cpu_kernel_output_bits_do_not_depend_on_row_tiling(cpu_matmul, m, n, fmt, seed):
    """The kernel tiles weight rows in pairs where it can: dropping the first weight row shifts
    every pairing, and no output may change by a bit (batch invariance rests on it)."""
    w = make_weight(fmt, n, 96, 32, seed)
    shifted = QuantizedWeight(
        w.bits,
        w.group_size,
        w.qs[1:].contiguous(),
        w.scales[1:].contiguous(),
        None if w.mins is None else w.mins[1:].contiguous(),
    )
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(cpu_matmul(x, w)[:, 1:], cpu_matmul(x, shifted))


@pytest.mark.parametrize("fmt", FORMATS + ["q8_0"])
@pytest.mark.parametrize("m,n", [(128, 7), (140, 256), (130, 300), (128, 513), (100, 65)])
def test_cpu_kernel_panel_path_matches_dequantized_reference(cpu_matmul, fmt, m, n):
    """From 128 activation rows on (a prefill, a large decode batch) the kernel dequantizes
    the weights into a float32 panel and multiplies it with oneDNN's GEMM; and 100 rows, the
    register tiles' largest case here."""
    w = make_weight(fmt, n, 192, 64, m)
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(n))
    assert_matches_reference(cpu_matmul, x, w)


@pytest.mark.parametrize("fmt", ["int4-asym", "q8_0"])
def test_cpu_kernel_splits_a_large_matrix_into_panels(cpu_matmul, fmt):
    """A matrix over the panel's 4M floats goes in several panels, each GEMM's output copied
    into its columns of y: 65,536 rows of 64 fill one panel, 300 more start a second."""
    w = make_weight(fmt, 65_536 + 300, 64, 32, 1)
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(2))
    assert_matches_reference(cpu_matmul, x, w)


@pytest.mark.parametrize("fmt", FORMATS + ["q8_0"])
def test_int8_activation_kernel_takes_the_float_panels_from_128_rows(fmt):
    """A prefill with --quantization-activations int8 runs the float32 panels (faster there,
    and exact up to summation order), so its result is the float kernel's, bit for bit."""
    from plait.backends.cpu.qmatmul import CpuQuantizedMatmul

    ext = vnni_extension()
    w = make_weight(fmt, 300, 192, 64, 5)
    for m, panels in [(127, False), (128, True), (200, True)]:
        x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m))
        got = ext.qmatmul_q8(x, w.qs, w.scales, w.mins, w.bits, w.group_size)
        assert torch.equal(got, CpuQuantizedMatmul()(x, w)) == panels
        if panels:
            assert_matches_reference(lambda x, w: got, x, w)


@pytest.mark.parametrize("fmt", FORMATS + ["q8_0"])
def test_torch_default_matches_dequantized_reference(fmt):
    w = make_weight(fmt, 33, 192, 64, 0)
    assert_matches_reference(torch_quantized_matmul, torch.randn(5, 192), w)


def test_cpu_kernel_keeps_leading_dims_and_dtype(cpu_matmul):
    w = make_weight("int4-asym", 40, 128, 128, 3)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    y = cpu_matmul(x, w)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), x.float() @ dequantize(w).T, atol=0.1, rtol=0.02)


@pytest.mark.cpu_kernel_level("portable")  # asks the portable build for its refusal
def test_cpu_kernel_has_the_simd_path_where_the_cpu_does():
    from plait.backends.cpu.cpp_build import best_level
    from plait.backends.cpu.qmatmul import CpuQuantizedMatmul, extension

    assert extension().simd_level() == best_level()
    # int8 activations run exactly where the build has the VNNI kernel, else are refused
    w, x = make_weight("int4-asym", 8, 64, 32, 0), torch.randn(3, 64)
    exact = CpuQuantizedMatmul()(x, w)
    if best_level() == "avx512vnni":
        assert not torch.equal(CpuQuantizedMatmul(int8_activations=True)(x, w), exact)
    for level in {"portable", best_level()} - {"avx512vnni"}:
        with pytest.raises(ValueError, match="int8 activations"):
            CpuQuantizedMatmul(level, int8_activations=True)


def test_int8_activations_match_the_reference_quantizer():
    ext = vnni_extension()
    x = torch.randn(7, 320) * torch.logspace(-3, 3, 320)  # blocks of very different ranges
    x[2, :32] = 0  # an all-zero block: d = 0, codes 0
    codes, d = ext.quantize_activations_q8(x)
    ref_codes, ref_d = quantize_activations(x)
    assert torch.equal(codes, ref_codes) and torch.equal(d, ref_d)
    assert (
        (x - (codes.float().view(7, 10, 32) * d[..., None]).view(7, 320)).abs()
        <= d.repeat_interleave(32, 1) / 2 + 1e-30
    ).all()


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_int8_activation_kernel_matches_dequantized_reference(shape):
    """Two bounds: against the same arithmetic on the quantized activations (float32
    accumulation only), and against the float activations (plus each block's rounding,
    ``|w| . d_x / 2``)."""
    ext = vnni_extension()
    m, n, blocks, fmt, group, seed = shape
    k = 32 * blocks
    if fmt.startswith("int4") and k % group:
        group = 32
    w = make_weight(fmt, n, k, group, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 3
    got = ext.qmatmul_q8(x, w.qs, w.scales, w.mins, w.bits, w.group_size).double()
    dense = dequantize(w).double()
    codes, d = quantize_activations(x)
    xq = (codes.double().view(m, blocks, 32) * d.double()[..., None]).view(m, k)
    exact = xq @ dense.T
    assert ((got - exact).abs() <= 1e-5 * (xq.abs() @ dense.abs().T) + 1e-6).all()
    rounding = (d.double() / 2).repeat_interleave(32, 1)  # per-element bound on |x - xq|
    bound = rounding @ dense.abs().T + 1e-5 * (x.double().abs() @ dense.abs().T) + 1e-6
    assert ((got - x.double() @ dense.T).abs() <= bound).all()


@pytest.mark.slow  # other builds of the extension, built in the background: kernel_prebuild.py
@pytest.mark.parametrize(
    "level",
    [pytest.param(lv, marks=pytest.mark.cpu_kernel_level(lv)) for lv in ("portable", "avx2")],
)
@pytest.mark.parametrize("fmt", FORMATS + ["q8_0"])
def test_lower_level_kernels_match_dequantized_reference(level, fmt):
    """The builds a CPU without AVX-512 VNNI (or without AVX2) runs."""
    from plait.backends.cpu.cpp_build import has_avx2
    from plait.backends.cpu.qmatmul import CpuQuantizedMatmul, extension

    if level == "avx2" and not has_avx2():
        pytest.skip("this CPU has no AVX2")
    assert extension(level).simd_level() == level
    assert not hasattr(extension(level), "qmatmul_q8")
    for m, n in [(1, 7), (9, 33), (17, 5), (128, 300)]:  # the last one takes the panel path
        w = make_weight(fmt, n, 192, 64, m)
        assert_matches_reference(CpuQuantizedMatmul(level), torch.randn(m, 192), w)
