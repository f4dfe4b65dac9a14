// Greedy next tokens from the final hidden states without the full float32 LM head: a
// bfloat16 screen with an error bound, then the few candidates recomputed exactly, so the
// token is the float32 logits' argmax bit for bit (src/greedy_head.cpp has the bound).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace greedy_head {

// Whether this build and this CPU can run the bfloat16 screen (AVX-512 BF16).
bool available();

// f of the screen's bound E = f * ||x|| * ||W_j|| for K-long rows.
double bound_factor(int64_t K);

// The float32 panels of panel_gemm::pack (W [V, K] as [ceil(V / 48), K, 48], K even, finite)
// -> (bfloat16 panels int16 [ceil(V / 48), K / 2, 48, 2] holding the bits, zero past V; row
// norms ||W_j|| float32 [V], rounded up).
std::vector<torch::Tensor> pack(const torch::Tensor& panels, int64_t V);

// x [B, K] float32; packed, norms = pack(panels, V); panels: panel_gemm's float32 panels of
// the same weight. Returns int64 [B]: each row's greedy token, -1 where undecided (the caller
// computes that row's float32 logits).
torch::Tensor argmax(const torch::Tensor& x, const torch::Tensor& packed,
                     const torch::Tensor& norms, const torch::Tensor& panels);

}  // namespace greedy_head
