// Float32 y = x W^T (+ b) for a weight packed once into column panels: the CPU backend's
// product for decode-sized batches and for prefill.
//
// Why: oneDNN's float32 linear (mkldnn::_linear_pointwise on a reordered weight) reaches the
// machine's FMA peak only from M ~ 128 rows; below that this kernel is faster, at decode sizes
// by streaming the weights at memory speed (benchmarks/kernels/panel_gemm_cpu.py; the figures
// are in docs/cpu-backend.md).
//
// Layout: W [N, K] is packed into ceil(N / 48) panels of [K, 48] floats, each panel contiguous
// and its columns past N zero. One pass of the micro-kernel keeps 8 rows x 48 columns of y in
// 24 AVX-512 registers and, for each k, loads the panel's 48 weights of that k once and
// multiplies them by the 8 rows' x[m, k]: the weights stream through memory exactly once per
// 8 rows, front to back, which the hardware prefetcher follows (a software prefetch is slower).
// Past the first 8 rows, the rest come in passes of near-equal height (17 rows: 8 + 5 + 4), not
// 8s and a remainder: a pass of 1-2 rows has too few independent sums to cover the
// multiply-add's latency. The 16-bit form is widened to float32 once per task (panel_rows).
//
// Work is split over (block of kRowChunk rows) x (panel) tasks, so a large M keeps its rows'
// x in cache while the panels pass, and a small M still splits over its panels.
//
// Holds: each y[m, n] is sum_k x[m, k] * W[n, k] accumulated in k order with fused
// multiply-adds, then + b[n]: the same value for a row whatever else is in the batch. Without
// AVX-512 (builds below the avx512vnni level) the same loop runs in portable C++, for tests;
// plait/backends/cpu/linear.py uses panels only where the AVX-512 kernel is built.
#include "plait_cpu/panel_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <c10/util/Half.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace panel_gemm {

constexpr int64_t kRows = 8;        // rows per micro-kernel pass
constexpr int64_t kRowChunk = 512;  // rows per task for large M

bool has_simd_kernel() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// W [N, K] float32 -> [ceil(N / kCols), K, kCols], zero past column N.
torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32,
              "panel_gemm.pack: weight must be float32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1), P = (N + kCols - 1) / kCols;
  torch::Tensor padded = torch::zeros({P * kCols, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  // [P, 48, K] -> [P, K, 48]
  return padded.view({P, kCols, K}).transpose(1, 2).contiguous();
}

// A panel holds float32 weights, or (encode_bf16's form) the high halves of float32 weights
// whose low halves are zero: widened back, the same float32.
inline float to_float(float w) { return w; }
inline float to_float(uint16_t w) {
  const uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// y[0:R, 0:cols] = x[0:R, :] @ panel, R rows of x at stride lda, y at stride ldy; with Spill,
// the panel's weights as float32 into spill [K, 48] too.
template <int R, bool Spill = false, typename W>
inline void tile(const float* __restrict x, int64_t lda, const W* __restrict panel, int64_t K,
                 float* __restrict y, int64_t ldy, int64_t cols, float* __restrict spill) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const W* wk = panel + k * kCols;
    const __m512 w0 = load16(wk), w1 = load16(wk + 16), w2 = load16(wk + 32);
    if constexpr (Spill) {
      _mm512_store_ps(spill + k * kCols, w0);
      _mm512_store_ps(spill + k * kCols + 16, w1);
      _mm512_store_ps(spill + k * kCols + 32, w2);
    }
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

template <int R, bool Spill = false, typename W>
inline void tile_rows(int64_t rows, const float* x, int64_t lda, const W* panel, int64_t K,
                      float* y, int64_t ldy, int64_t cols, float* spill = nullptr) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1, Spill>(rows, x, lda, panel, K, y, ldy, cols, spill);
  }
  tile<R, Spill>(x, lda, panel, K, y, ldy, cols, spill);
}
#endif

#if defined(__AVX512F__)
// This thread's scratch panel [K, 48] float32, 64-byte aligned, reused by its later tasks.
inline float* scratch_panel(int64_t K) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < K * kCols + 16) scratch.resize(K * kCols + 16);
  return reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~static_cast<uintptr_t>(63));
}
#endif

// y[0:rows, 0:cols] for one panel; rows of any count. The first pass takes kRows rows and reads
// the panel from memory (where a small M's time goes: its multiply-adds overlap that stream);
// the rows after it, read from cache, go in ceil((rows - kRows) / kRows) passes whose heights
// differ by at most one, so no pass of 1-2 rows is left over (17 rows: 8 + 5 + 4). A 16-bit
// panel is widened once, by the first pass, which stores the float32 weights for the others.
// Each row's sums are the same whichever pass holds it.
template <typename W>
inline void panel_rows(int64_t rows, const float* x, int64_t lda, const W* panel, int64_t K,
                       float* y, int64_t ldy, int64_t cols) {
#if defined(__AVX512F__)
  if (rows <= kRows) return tile_rows<kRows>(rows, x, lda, panel, K, y, ldy, cols);
  const float* rest = nullptr;
  if constexpr (std::is_same_v<W, float>) {
    tile_rows<kRows>(kRows, x, lda, panel, K, y, ldy, cols);
    rest = panel;
  } else {
    float* spill = scratch_panel(K);
    tile_rows<kRows, true>(kRows, x, lda, panel, K, y, ldy, cols, spill);
    rest = spill;
  }
  const int64_t left = rows - kRows, passes = (left + kRows - 1) / kRows;
  const int64_t height = left / passes, taller = left % passes;
  for (int64_t i = 0, m0 = kRows; i < passes; ++i) {
    const int64_t h = height + (i < taller ? 1 : 0);
    tile_rows<kRows>(h, x + m0 * lda, lda, rest, K, y + m0 * ldy, ldy, cols);
    m0 += h;
  }
#else
  float acc[kCols];
  for (int64_t m = 0; m < rows; ++m) {
    std::fill(acc, acc + kCols, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[m * lda + k];
      const W* wk = panel + k * kCols;
      for (int64_t c = 0; c < kCols; ++c) acc[c] = std::fma(xv, to_float(wk[c]), acc[c]);
    }
    std::copy(acc, acc + cols, y + m * ldy);
  }
#endif
}

// y [..., N] for x [..., K], uninitialized.
inline torch::Tensor output_for(const torch::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return torch::empty(shape, x.options());
}

// The product of linear() and linear_bf16(): x [..., K] (checked) by P panels at wp.
template <typename W>
inline torch::Tensor product(const torch::Tensor& x_in, const W* wp, int64_t P, int64_t K,
                             int64_t N, const c10::optional<torch::Tensor>& bias) {
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.numel() / K;
  torch::Tensor y = output_for(x, N);
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
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

// The checks every product from panels makes: x float32 with K in its last dim, N within the
// P panels' columns. `fn` names the caller in the errors.
inline void check_product(const char* fn, const torch::Tensor& x, int64_t P, int64_t K,
                          int64_t N) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, fn, ": x must be float32");
  TORCH_CHECK(N > 0 && N <= P * kCols && N > (P - 1) * kCols,
              fn, ": N=", N, " does not match ", P, " panels");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, fn, ": x's last dim ",
              x.dim() >= 1 ? x.size(-1) : -1, " != the weight's K=", K);
}

// x [..., K] float32, packed from pack() of a weight [N, K]; returns [..., N].
torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t N,
                     const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("plait::panel_linear", std::vector<c10::IValue>({x_in}));
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kCols && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kFloat32,
              "panel_gemm.linear: packed must come from panel_gemm.pack");
  const int64_t K = packed.size(1), P = packed.size(0);
  check_product("panel_gemm.linear", x_in, P, K, N);
  return product(x_in, packed.data_ptr<float>(), P, K, N, bias);
}

// ---------------------------------------------------------------------------------------------
// The same panels stored as 4-bit codes, when that loses nothing.
//
// Why: a decode step streams every weight from memory once; at batch 1 that stream is the
// step.
// Many float32 checkpoints hold far fewer distinct values than float32 can: a model converted
// from GGUF Q4_1 has, in each 32-weight block of a row, at most 16 values d * q + m (q in
// 0..15). Where every block of a weight is exactly such a grid, the weight is kept as its codes
// plus one (scale, offset) pair per block: 6 bits a weight instead of 32.
//
// Holds: the codes are used only if decoding reproduces every float32 of the panel bit for bit
// (encode_affine4 checks each one, else returns nothing and the float32 panels stay), and
// every product from them takes the same multiply-adds in the same k order as tile(): the
// products are the float32 panels', bit for bit, at any M.
//
// Layout (per panel p, column c of its 48, block b of kCodeBlock rows of k):
//   codes   uint8 [P, K / 2, 48]: byte (k / 2, c) holds k's code in its low nibble and k + 1's
//           in its high one (the codes of 16 columns for two k are one 16-byte load);
//   scales, offsets float32 [P, K / kCodeBlock, 48]: weight = fma(code, scale, offset).
constexpr int64_t kCodeBlock = 32;

namespace affine4_detail {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// codes for the n values v[i * stride] such that fma(code, d, m) reproduces each one exactly,
// or false. n <= kCodeBlock.
inline bool fit_block(const float* v, int64_t stride, int64_t n, float d, float m,
                      uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = v[i * stride];
    const float guess = d == 0.f ? 0.f : std::nearbyint((x - m) / d);
    if (!(guess >= 0.f && guess <= 15.f)) return false;  // NaN fails too
    if (bits_of(std::fma(guess, d, m)) != bits_of(x)) return false;
    codes[i] = static_cast<uint8_t>(guess);
  }
  return true;
}

// (d, m) and codes for one block: m is its minimum, so some code is 0; the largest value has
// code qmax <= 15, so d is near (max - m) / qmax. Tried from qmax = 15 down, each with d as
// computed and d rounded to float16 (GGUF stores its scales so).
inline bool encode_block(const float* v, int64_t stride, int64_t n, float* d_out, float* m_out,
                         uint8_t* codes) {
  float lo = v[0], hi = v[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, v[i * stride]);
    hi = std::max(hi, v[i * stride]);
  }
  if (!std::isfinite(lo) || !std::isfinite(hi)) return false;
  if (hi == lo) {
    *d_out = 0.f;
    *m_out = lo;
    return fit_block(v, stride, n, 0.f, lo, codes);
  }
  for (int qmax = 15; qmax >= 1; --qmax) {
    const float d = (hi - lo) / static_cast<float>(qmax);
    const float d16 = static_cast<float>(c10::Half(d));
    for (const float cand : {d16, d}) {
      if (cand > 0.f && fit_block(v, stride, n, cand, lo, codes)) {
        *d_out = cand;
        *m_out = lo;
        return true;
      }
    }
  }
  return false;
}

}  // namespace affine4_detail

// The 4-bit form of pack()'s panels (codes, scales, offsets), or an empty tuple where some
// value is not on its block's grid.
std::vector<torch::Tensor> encode_affine4(const torch::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kCols && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kFloat32,
              "panel_gemm.encode_affine4: packed must come from panel_gemm.pack");
  const int64_t P = packed.size(0), K = packed.size(1);
  if (K % kCodeBlock != 0) return {};
  const int64_t B = K / kCodeBlock;
  auto codes = torch::empty({P, K / 2, kCols}, packed.options().dtype(torch::kUInt8));
  auto scales = torch::empty({P, B, kCols}, packed.options());
  auto offsets = torch::empty({P, B, kCols}, packed.options());
  const float* wp = packed.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  float* op = offsets.data_ptr<float>();
  std::atomic<bool> exact{true};
  at::parallel_for(0, P * B, 16, [&](int64_t t0, int64_t t1) {
    uint8_t block[kCodeBlock];
    for (int64_t t = t0; t < t1 && exact.load(std::memory_order_relaxed); ++t) {
      const int64_t p = t / B, b = t % B;
      const float* base = wp + (p * K + b * kCodeBlock) * kCols;
      uint8_t* dst = cp + (p * (K / 2) + b * kCodeBlock / 2) * kCols;
      for (int64_t c = 0; c < kCols; ++c) {
        float* d = sp + (p * B + b) * kCols + c;
        float* m = op + (p * B + b) * kCols + c;
        if (!affine4_detail::encode_block(base + c, kCols, kCodeBlock, d, m, block)) {
          exact.store(false, std::memory_order_relaxed);
          return;
        }
        for (int64_t i = 0; i < kCodeBlock; i += 2)
          dst[(i / 2) * kCols + c] = static_cast<uint8_t>(block[i] | (block[i + 1] << 4));
      }
    }
  });
  if (!exact.load()) return {};
  return {codes, scales, offsets};
}

// Panel p of the 4-bit form back to float32 [K, 48] at out (64-byte aligned).
inline void decode_affine4_panel(const uint8_t* __restrict codes, const float* __restrict scales,
                                 const float* __restrict offsets, int64_t K,
                                 float* __restrict out) {
  for (int64_t b = 0; b < K / kCodeBlock; ++b) {
    const uint8_t* c = codes + b * (kCodeBlock / 2) * kCols;
    const float* d = scales + b * kCols;
    const float* m = offsets + b * kCols;
    float* o = out + b * kCodeBlock * kCols;
#if defined(__AVX512F__)
    const __m512i low = _mm512_set1_epi32(15);
    for (int g = 0; g < 3; ++g) {
      const __m512 dg = _mm512_loadu_ps(d + 16 * g), mg = _mm512_loadu_ps(m + 16 * g);
      for (int64_t i = 0; i < kCodeBlock / 2; ++i) {
        const __m512i q = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i * kCols + 16 * g)));
        float* row = o + 2 * i * kCols + 16 * g;
        _mm512_store_ps(row, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), dg,
                                             mg));
        _mm512_store_ps(row + kCols,
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), dg, mg));
      }
    }
#else
    for (int64_t i = 0; i < kCodeBlock / 2; ++i)
      for (int64_t j = 0; j < kCols; ++j) {
        const uint8_t byte = c[i * kCols + j];
        o[(2 * i) * kCols + j] = std::fma(static_cast<float>(byte & 15), d[j], m[j]);
        o[(2 * i + 1) * kCols + j] = std::fma(static_cast<float>(byte >> 4), d[j], m[j]);
      }
#endif
  }
}

#if defined(__AVX512F__)
// y[0:R, 16 j0 : 16 (j0 + G)] of one panel straight from its codes, for a few rows: the weights
// are decoded in registers, two k at a time, and never stored. Each y accumulates in k order
// with fused multiply-adds from zero, as tile() does: the same bits. R * G independent sums
// are in flight (G = 3 for up to 4 rows), enough to cover the multiply-add's latency.
template <int R, int G>
inline void tile_affine4(const float* __restrict x, int64_t lda, const uint8_t* __restrict codes,
                         const float* __restrict scales, const float* __restrict offsets,
                         int64_t K, int j0, float* __restrict y, int64_t ldy, int64_t cols) {
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t b = 0; b < K / kCodeBlock; ++b) {
    __m512 d[G], m[G];
    for (int g = 0; g < G; ++g) {
      d[g] = _mm512_loadu_ps(scales + b * kCols + 16 * (j0 + g));
      m[g] = _mm512_loadu_ps(offsets + b * kCols + 16 * (j0 + g));
    }
    const uint8_t* c = codes + b * (kCodeBlock / 2) * kCols + 16 * j0;
    const float* xk = x + b * kCodeBlock;
#pragma GCC unroll 2
    for (int64_t i = 0; i < kCodeBlock / 2; ++i) {
      __m512 w0[G], w1[G];
      for (int g = 0; g < G; ++g) {
        const __m512i q = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i * kCols + 16 * g)));
        w0[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), d[g], m[g]);
        w1[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d[g], m[g]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 x0 = _mm512_set1_ps(xk[r * lda + 2 * i]);
        for (int g = 0; g < G; ++g) acc[r][g] = _mm512_fmadd_ps(x0, w0[g], acc[r][g]);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 x1 = _mm512_set1_ps(xk[r * lda + 2 * i + 1]);
        for (int g = 0; g < G; ++g) acc[r][g] = _mm512_fmadd_ps(x1, w1[g], acc[r][g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const int64_t n = std::min<int64_t>(16, cols - 16 * (j0 + g));
    if (n <= 0) continue;
    const __mmask16 mask = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + r * ldy + 16 * (j0 + g), mask, acc[r][g]);
  }
}

// tile_affine4 for `rows` <= R rows: all three column groups at once up to 4 rows, one group
// (of the three tasks a panel then makes) from 5.
template <int R>
inline void tile_affine4_rows(int64_t rows, const float* x, int64_t lda, const uint8_t* codes,
                              const float* scales, const float* offsets, int64_t K, int j,
                              float* y, int64_t ldy, int64_t cols) {
  if constexpr (R > 1) {
    if (rows < R)
      return tile_affine4_rows<R - 1>(rows, x, lda, codes, scales, offsets, K, j, y, ldy, cols);
  }
  if constexpr (R <= 4) {
    tile_affine4<R, 3>(x, lda, codes, scales, offsets, K, 0, y, ldy, cols);
  } else {
    tile_affine4<R, 1>(x, lda, codes, scales, offsets, K, j, y, ldy, cols);
  }
}
#endif

// linear() for the 4-bit form, the same results as linear() on the panels it was encoded
// from, bit for bit. Up to kRegisterDecodeRows rows the codes are decoded in registers
// (tile_affine4); above, each task decodes its panel into a per-thread scratch panel (in
// cache) and multiplies it with the float32 tile code.
torch::Tensor linear_affine4(const torch::Tensor& x_in, const torch::Tensor& codes,
                             const torch::Tensor& scales, const torch::Tensor& offsets,
                             int64_t N, const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("plait::panel_linear_affine4", std::vector<c10::IValue>({x_in}));
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kCols && codes.is_contiguous() &&
                  codes.scalar_type() == torch::kUInt8,
              "panel_gemm.linear_affine4: codes must come from encode_affine4");
  const int64_t P = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(scales.sizes() == offsets.sizes() && scales.dim() == 3 && scales.size(0) == P &&
                  scales.size(1) * kCodeBlock == K && scales.size(2) == kCols &&
                  scales.is_contiguous() && offsets.is_contiguous() &&
                  scales.scalar_type() == torch::kFloat32 &&
                  offsets.scalar_type() == torch::kFloat32,
              "panel_gemm.linear_affine4: scales and offsets must come from encode_affine4");
  check_product("panel_gemm.linear_affine4", x_in, P, K, N);
  const torch::Tensor x = x_in.contiguous();
  const int64_t M = x.numel() / K;
  torch::Tensor y = output_for(x, N);
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offsets.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk, B = K / kCodeBlock;
#if defined(__AVX512F__)
  if (M <= kRegisterDecodeRows) {
    // tasks: panels up to 4 rows; (panel, 16-column group) pairs from 5
    const int64_t groups = M <= 4 ? 1 : 3;
    at::parallel_for(0, P * groups, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / groups;
        tile_affine4_rows<kRegisterDecodeRows>(
            M, xp, K, cp + p * (K / 2) * kCols, sp + p * B * kCols, op + p * B * kCols, K,
            static_cast<int>(t % groups), yp + p * kCols, N, std::min(kCols, N - p * kCols));
      }
    });
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    return y;
  }
#endif
  at::parallel_for(0, chunks * P, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < K * kCols + 16) scratch.resize(K * kCols + 16);
    float* panel = reinterpret_cast<float*>(
        (reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~static_cast<uintptr_t>(63));
    int64_t decoded = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t % P, chunk = t / P;
      const int64_t m0 = chunk * kRowChunk, rows = std::min(kRowChunk, M - m0);
      if (p != decoded) {
        decode_affine4_panel(cp + p * (K / 2) * kCols, sp + p * B * kCols, op + p * B * kCols,
                             K, panel);
        decoded = p;
      }
      panel_rows(rows, xp + m0 * K, K, panel, K, yp + m0 * N + p * kCols, N,
                 std::min(kCols, N - p * kCols));
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

// ---------------------------------------------------------------------------------------------
// The same panels as 16-bit halves, when that loses nothing: a float32 checkpoint upcast from
// bfloat16 (most released checkpoints are stored so) has every low half zero. Half the bytes
// to stream; widened back in the tile's loads, the same float32 and the same products.

// The high halves of pack()'s panels, uint16 [P, K, 48], or an empty list where some value has
// a nonzero low half.
std::vector<torch::Tensor> encode_bf16(const torch::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kCols && packed.is_contiguous() &&
                  packed.scalar_type() == torch::kFloat32,
              "panel_gemm.encode_bf16: packed must come from panel_gemm.pack");
  const torch::Tensor bits = packed.view(torch::kInt32);
  if (bits.bitwise_and(0xFFFF).any().item<bool>()) return {};
  // the values are exactly bfloat16: the conversion keeps each high half as it is
  return {packed.to(torch::kBFloat16).view(torch::kUInt16).contiguous()};
}

// linear() from encode_bf16's halves: the same results as linear() on the panels, bit for bit.
torch::Tensor linear_bf16(const torch::Tensor& x_in, const torch::Tensor& halves, int64_t N,
                          const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("plait::panel_linear_bf16", std::vector<c10::IValue>({x_in}));
  TORCH_CHECK(halves.dim() == 3 && halves.size(2) == kCols && halves.is_contiguous() &&
                  halves.scalar_type() == torch::kUInt16,
              "panel_gemm.linear_bf16: halves must come from encode_bf16");
  const int64_t K = halves.size(1), P = halves.size(0);
  check_product("panel_gemm.linear_bf16", x_in, P, K, N);
  return product(x_in, halves.data_ptr<uint16_t>(), P, K, N, bias);
}

// The product from a panel weight in whichever form reads fastest: `form` is encode_bf16's
// [halves] (read at every size), encode_affine4's [codes, scales, offsets] (read up to
// kRegisterDecodeRows rows), or empty; otherwise the float32 panels. The same bits either way.
// PackedLinear (plait/backends/cpu/linear.py) and the layer step both call this.
torch::Tensor linear_with_form(const torch::Tensor& x, const torch::Tensor& packed,
                               const std::vector<torch::Tensor>& form, int64_t N,
                               const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(form.size() <= 1 || form.size() == 3,
              "panel_gemm.linear_with_form: form must be empty, encode_bf16's [halves] or "
              "encode_affine4's [codes, scales, offsets]");
  if (form.size() == 1) return linear_bf16(x, form[0], N, bias);
  if (form.size() == 3 && x.numel() <= kRegisterDecodeRows * x.size(-1))
    return linear_affine4(x, form[0], form[1], form[2], N, bias);
  return linear(x, packed, N, bias);
}

}  // namespace panel_gemm
