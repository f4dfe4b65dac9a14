// Float32 y = x W^T (+ b) from a weight packed once into column panels [ceil(N / 48), K, 48],
// and from its lossless 4-bit and 16-bit forms (src/panel_gemm.cpp says how and why). Every
// product of one weight, in any form, gives the same bits.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace panel_gemm {

constexpr int64_t kCols = 48;  // columns per panel: three 16-float vectors

// Up to this many rows linear_affine4 decodes the 4-bit codes in registers and is the faster
// form; above, it decodes each panel into scratch and is slower than the float32 panels, so
// callers holding both forms use the panels there (benchmarks/kernels/compact_weights_cpu.py;
// the figures are in docs/cpu-backend.md).
constexpr int64_t kRegisterDecodeRows = 16;

// Whether this build has the AVX-512 kernel (else the portable loop, for tests).
bool has_simd_kernel();

// W [N, K] float32 -> [ceil(N / kCols), K, kCols], zero past column N.
torch::Tensor pack(const torch::Tensor& w);

// x [..., K] float32, packed from pack() of a weight [N, K]; returns [..., N].
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N,
                     const c10::optional<torch::Tensor>& bias = c10::nullopt);

// pack()'s panels as 4-bit codes [codes, scales, offsets] that decode to the same float32 bit
// for bit, or [] where a value is off its 32-row block's grid.
std::vector<torch::Tensor> encode_affine4(const torch::Tensor& packed);

// linear() from encode_affine4's form: the same bits.
torch::Tensor linear_affine4(const torch::Tensor& x, const torch::Tensor& codes,
                             const torch::Tensor& scales, const torch::Tensor& offsets,
                             int64_t N, const c10::optional<torch::Tensor>& bias);

// pack()'s panels as their high 16-bit halves [halves], or [] where a low half is not 0.
std::vector<torch::Tensor> encode_bf16(const torch::Tensor& packed);

// linear() from encode_bf16's halves: the same bits.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& halves, int64_t N,
                          const c10::optional<torch::Tensor>& bias);

// The product from whichever form of the weight reads fastest: `form` is encode_bf16's
// [halves] (read at every size), encode_affine4's [codes, scales, offsets] (read up to
// kRegisterDecodeRows rows), or empty; otherwise the float32 panels. The same bits either way.
torch::Tensor linear_with_form(const torch::Tensor& x, const torch::Tensor& packed,
                               const std::vector<torch::Tensor>& form, int64_t N,
                               const c10::optional<torch::Tensor>& bias);

}  // namespace panel_gemm
