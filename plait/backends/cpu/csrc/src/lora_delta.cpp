// The LoRA delta of one wrapped projection, for the rows of a native step.
//
// Why here and not in torch: the eager path (plait/lora/ops.py) does one gathered shrink and
// expand per adapter, a few tensor ops each, for each of a layer's four projections; at decode
// batch 16 over 8 adapters that is thousands of dispatches a step, and it forces the whole
// batch off the native step onto the eager layers (benchmarks.offline's lora8 preset measured
// 0.28x the base model with the kernels built). The per-row product here is small (K = the
// group's stacked rank, at most a few hundred MACs per output) and reads only the row's own
// adapter, so the step stays one C++ call whatever the mix of adapters.
//
// Arithmetic: h = A[s] x (K dots over `in`), then y += sum_k (h[k] * scaling[s]) BT[s][k], an
// axpy per k over the output row (BT is lora_B transposed, kept by the pool beside B, so the
// expand reads contiguous rows); a zero h[k] (the pool's padding of a smaller rank) is
// skipped. Results differ from peft's ``base(x) + lora_B(lora_A(x)) * scaling`` only in the
// sums' rounding, as the eager path's do.
//
// Holds: rows are independent (parallel over rows); the pool's zero padding of A's rows and
// B's columns adds exact zeros; slots are checked against A's first dimension.
#include "plait_cpu/lora_delta.h"

#include <ATen/Parallel.h>

#include <vector>

#include "plait_cpu/simd.h"

namespace lora_delta {

namespace {

float dot(const float* a, const float* b, int64_t n) {
  simd::Vec16 acc{};
  int64_t i = 0;
  for (; i + simd::kLanes <= n; i += simd::kLanes) acc += simd::load16(a + i) * simd::load16(b + i);
  float s = 0.f;
  for (int64_t l = 0; l < simd::kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void add(const torch::Tensor& x, torch::Tensor& y, const torch::Tensor& a,
         const torch::Tensor& bt, const torch::Tensor& row_slots, const torch::Tensor& scaling) {
  const torch::Tensor& b = bt;
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && a.is_contiguous() && b.is_contiguous(),
              "lora_delta: tensors must be contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && y.scalar_type() == torch::kFloat32 &&
                  a.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32,
              "lora_delta: float32 only");
  const int64_t R = x.size(0), in = x.size(1), out = y.size(1);
  const int64_t S = a.size(0), K = a.size(1);
  TORCH_CHECK(a.size(2) == in && b.size(0) == S && b.size(1) == K && b.size(2) == out &&
                  y.size(0) == R && row_slots.numel() == R && scaling.numel() == S,
              "lora_delta: shapes do not match");
  const int64_t* slot = row_slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(slot[r] >= -1 && slot[r] < S, "lora_delta: slot out of range: ", slot[r]);
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float* sp = scaling.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> h(K);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s = slot[r];
      if (s < 0) continue;
      const float* xr = xp + r * in;
      const float* as = ap + s * K * in;
      for (int64_t k = 0; k < K; ++k) h[k] = dot(as + k * in, xr, in);
      const float* bs = bp + s * K * out;
      float* yr = yp + r * out;
      for (int64_t k = 0; k < K; ++k) {
        const float c = h[k] * sp[s];
        if (c == 0.f) continue;
        const float* brow = bs + k * out;
        for (int64_t o = 0; o < out; ++o) yr[o] += c * brow[o];
      }
    }
  });
}

}  // namespace lora_delta
