// Float32 y = x W^T (+ b) for a weight packed once into column panels: the CPU backend's
// product for decode-sized batches and for prefill.
//
// Why: oneDNN's float32 linear (mkldnn::_linear_pointwise on a reordered weight) reaches this
// machine's FMA peak only from M ~ 128 rows. Below that, on SmolLM2-135M's shapes with the
// weights streamed from memory as a decode step streams them, all of one step's products took
// 28 ms at M = 1 (~20 GB/s of weights) and 33 ms at M = 16 (~135 GFLOP/s) on the 2-core
// AVX-512 development machine; this kernel took 11 ms and 23 ms (~185 GFLOP/s), and at M = 64
// 81 against 94 ms (benchmarks/panel_gemm_cpu.py has the table).
//
// Layout: W [N, K] is packed into ceil(N / 48) panels of [K, 48] floats, each panel contiguous
// and its columns past N zero. One pass of the micro-kernel keeps 8 rows x 48 columns of y in
// 24 AVX-512 registers and, for each k, loads the panel's 48 weights of that k once and
// multiplies them by the 8 rows' x[m, k]: the weights stream through memory exactly once per
// 8 rows, front to back, which the hardware prefetcher follows (a software prefetch measured
// slower). Rows come in blocks of 8; 1-7 leftover rows use the same kernel at that height.
//
// Work is split over (block of kRowChunk rows) x (panel) tasks, so a large M keeps its rows'
// x in cache while the panels pass, and a small M still splits over its panels.
//
// Holds: each y[m, n] is sum_k x[m, k] * W[n, k] accumulated in k order with fused
// multiply-adds, then + b[n]: the same value for a row whatever else is in the batch. Without
// AVX-512 (builds below the avx512vnni level) the same loop runs in portable C++, for tests;
// plait/backends/cpu/linear.py uses panels only where the AVX-512 kernel is built.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace panel_gemm {

constexpr int64_t kCols = 48;       // columns per panel: three 16-float vectors
constexpr int64_t kRows = 8;        // rows per micro-kernel pass
constexpr int64_t kRowChunk = 512;  // rows per task for large M

inline bool has_simd_kernel() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// W [N, K] float32 -> [ceil(N / kCols), K, kCols], zero past column N.
inline torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32,
              "panel_gemm.pack: weight must be float32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kCols - 1) / kCols;
  torch::Tensor padded = torch::zeros({P * kCols, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  // [P, 48, K] -> [P, K, 48]
  return padded.view({P, kCols, K}).transpose(1, 2).contiguous();
}

#if defined(__AVX512F__)
// y[0:R, 0:cols] = x[0:R, :] @ panel, R rows of x at stride lda, y at stride ldy.
template <int R>
inline void tile(const float* __restrict x, int64_t lda, const float* __restrict panel, int64_t K,
                 float* __restrict y, int64_t ldy, int64_t cols) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = panel + k * kCols;
    const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16),
                 w2 = _mm512_loadu_ps(wk + 32);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
    }
  }
  if (cols == kCols) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 3; ++j) _mm512_storeu_ps(y + r * ldy + 16 * j, acc[r][j]);
    return;
  }
  alignas(64) float row[kCols];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 3; ++j) _mm512_store_ps(row + 16 * j, acc[r][j]);
    std::copy(row, row + cols, y + r * ldy);
  }
}

template <int R>
inline void tile_rows(int64_t rows, const float* x, int64_t lda, const float* panel, int64_t K,
                      float* y, int64_t ldy, int64_t cols) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(rows, x, lda, panel, K, y, ldy, cols);
  }
  tile<R>(x, lda, panel, K, y, ldy, cols);
}
#endif

// y[0:rows, 0:cols] for one panel; rows of any count.
inline void panel_rows(int64_t rows, const float* x, int64_t lda, const float* panel, int64_t K,
                       float* y, int64_t ldy, int64_t cols) {
#if defined(__AVX512F__)
  for (int64_t m0 = 0; m0 < rows; m0 += kRows)
    tile_rows<kRows>(std::min(kRows, rows - m0), x + m0 * lda, lda, panel, K, y + m0 * ldy,
                     ldy, cols);
#else
  float acc[kCols];
  for (int64_t m = 0; m < rows; ++m) {
    std::fill(acc, acc + kCols, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[m * lda + k];
      const float* wk = panel + k * kCols;
      for (int64_t c = 0; c < kCols; ++c) acc[c] = std::fma(xv, wk[c], acc[c]);
    }
    std::copy(acc, acc + cols, y + m * ldy);
  }
#endif
}

// x [..., K] float32, packed from pack() of a weight [N, K]; returns [..., N].
inline torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t N,
                            const c10::optional<torch::Tensor>& bias = c10::nullopt) {
  RECORD_FUNCTION("plait::panel_linear", std::vector<c10::IValue>({x_in}));
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat32, "panel_gemm.linear: x must be float32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kCols && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kFloat32,
              "panel_gemm.linear: packed must come from panel_gemm.pack");
  const int64_t K = packed.size(1), P = packed.size(0);
  TORCH_CHECK(N > 0 && N <= P * kCols && N > (P - 1) * kCols,
              "panel_gemm.linear: N=", N, " does not match ", P, " panels");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == K, "panel_gemm.linear: x's last dim ",
              x_in.dim() >= 1 ? x_in.size(-1) : -1, " != the weight's K=", K);
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.numel() / K;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  torch::Tensor y = torch::empty(out_shape, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks * P, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / P, p = t % P;
      const int64_t m0 = chunk * kRowChunk, rows = std::min(kRowChunk, M - m0);
      panel_rows(rows, xp + m0 * K, K, wp + p * K * kCols, K, yp + m0 * N + p * kCols, N,
                 std::min(kCols, N - p * kCols));
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

}  // namespace panel_gemm
