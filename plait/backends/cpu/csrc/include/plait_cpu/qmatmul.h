// Weight-only quantized matmul y[M, N] = x[M, K] @ W[N, K]^T for plait.quant.formats'
// QuantizedWeight (src/qmatmul.cpp says how), and oneDNN's float32 linear.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "plait_cpu/simd.h"

namespace qmatmul {

// x [M, K] float32 by 8-bit codes, or 4-bit codes in GGUF nibble order with (Q4_1) or without
// (Q4_0) per-group mins `mins`; float16 scales per group of `group` inputs.
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor qs, torch::Tensor scales,
                      c10::optional<torch::Tensor> mins, int64_t bits, int64_t group);

#ifdef PLAIT_VNNI
// qmatmul with x quantized to int8 per 32-block and VNNI dot products.
torch::Tensor qmatmul_q8(torch::Tensor x, torch::Tensor qs, torch::Tensor scales,
                         c10::optional<torch::Tensor> mins, int64_t bits, int64_t group);

// x's int8 codes [M, K] and float d_x [M, K / 32], as qmatmul_q8 quantizes them (for tests).
std::vector<torch::Tensor> quantize_activations_q8(torch::Tensor x);
#endif

// oneDNN's float32 linear (mkldnn::_linear_pointwise): y = x @ w^T (+ bias) for a weight
// prepacked by mkldnn::_reorder_linear_weight or a plain row-major [N, K] one.
torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& w,
                            const c10::optional<torch::Tensor>& bias = c10::nullopt);

}  // namespace qmatmul
