// Greedy next tokens from the final hidden states without the full float32 LM head.
//
// Why: the LM head is the largest product of a small model's decode step (SmolLM2-135M: 113 MB
// of its 540 MB of float32 weights, a fifth of its multiply-adds), and a greedy request needs
// only the index of the largest logit, not the logits.
//
// How (exact, not an approximation): every logit is first computed from bfloat16 copies of x
// and W with AVX-512 BF16 dot products (half the bytes and twice the multiply-adds a cycle of
// float32 FMAs). Each such logit differs from the float32 one panel_gemm computes by at most
//   E[b, j] = f * ||x_b|| * ||W_j||,  f = 2u + u^2 + 3K * 2^-23 (u = 2^-9, bfloat16's unit
// roundoff): rounding x and W to bfloat16 moves each product by at most (2u + u^2)|x_k W_jk|,
// the two float32 sums add at most 3K * 2^-24 * sum |x_k W_jk| between them, and
// sum |x_k W_jk| <= ||x|| ||W_j|| (Cauchy-Schwarz). f and the norms are rounded up. A token j
// can be the float32 argmax only if approx[j] + E[j] >= L = max_i (approx[i] - E[i]); those
// candidates (typically a handful) are recomputed exactly as panel_gemm does (k in order,
// fused multiply-adds from zero: the same bits), and the first index of their maximum wins,
// as torch.max does. So the token is the one the float32 logits would give, bit for bit.
//
// Where that cannot be decided (x or a candidate's logit not finite, the row's E not finite)
// the row's answer is -1 and the caller computes its float32 logits the ordinary way.
#include "plait_cpu/greedy_head.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace greedy_head {

constexpr int64_t kCols = 48;  // columns per panel: three vectors of 16 float sums
constexpr int64_t kRows = 8;   // rows per micro-kernel pass

// Whether this build and this CPU can run the bfloat16 screen.
bool available() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

inline uint16_t to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// The float32 panels of panel_gemm.pack (W [V, K] as [ceil(V / 48), K, 48], K even, finite)
// -> (bfloat16 panels int16 [ceil(V / 48), K / 2, 48, 2] holding the bits, zero past V; row
// norms ||W_j|| float32 [V], rounded up).
std::vector<torch::Tensor> pack(const torch::Tensor& panels, int64_t V) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kCols && panels.is_contiguous() &&
                  panels.scalar_type() == torch::kFloat32,
              "greedy_head.pack: weight must be panel_gemm's float32 panels [P, K, 48]");
  const int64_t P = panels.size(0), K = panels.size(1);
  TORCH_CHECK(V > (P - 1) * kCols && V <= P * kCols, "greedy_head.pack: V=", V,
              " does not match ", P, " panels");
  TORCH_CHECK(K % 2 == 0 && K > 0, "greedy_head.pack: K must be even, got ", K);
  TORCH_CHECK(torch::isfinite(panels).all().item<bool>(), "greedy_head.pack: weight not finite");
  torch::Tensor packed = torch::zeros({P, K / 2, kCols, 2}, torch::kInt16);
  torch::Tensor norms = torch::empty({V}, torch::kFloat32);
  const float* wp = panels.data_ptr<float>();
  uint16_t* pp = reinterpret_cast<uint16_t*>(packed.data_ptr<int16_t>());
  float* np = norms.data_ptr<float>();
  at::parallel_for(0, V, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t p = j / kCols, c = j % kCols;
      double sq = 0;
      for (int64_t k = 0; k < K; ++k) {
        const float v = wp[(p * K + k) * kCols + c];
        sq += static_cast<double>(v) * v;
        pp[((p * (K / 2) + k / 2) * kCols + c) * 2 + k % 2] = to_bf16(v);
      }
      np[j] = std::nextafter(static_cast<float>(std::sqrt(sq) * (1 + 1e-12)),
                             std::numeric_limits<float>::infinity());
    }
  });
  return {packed, norms};
}

#if defined(__AVX512F__)
// approx[0:R, 0:48] for one panel from R rows of bfloat16 pairs xb (K / 2 pairs a row).
template <int R>
__attribute__((target("avx512bf16"))) inline void tile(
    const uint32_t* __restrict xb, int64_t half_k, const uint16_t* __restrict panel,
    float* __restrict y, int64_t ldy) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < half_k; ++k) {
    const uint16_t* wk = panel + k * kCols * 2;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xb[r * half_k + k]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xv, w2);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) _mm512_storeu_ps(y + r * ldy + 16 * j, acc[r][j]);
}

template <int R>
inline void tile_rows(int64_t rows, const uint32_t* xb, int64_t half_k, const uint16_t* panel,
                      float* y, int64_t ldy) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<R - 1>(rows, xb, half_k, panel, y, ldy);
  }
  tile<R>(xb, half_k, panel, y, ldy);
}
#endif

#if defined(__AVX512F__)
// The candidates of one row: every j < V with a[j] + s n[j] >= max_i (a[i] - s n[i]), in
// order. False (undecided) if some a[j] is NaN. Float arithmetic: |a[j]| <= ~250 s n[j] (a
// bfloat16 dot product is at most ~||x|| ||W_j||, and s n[j] is f ||x|| ||W_j|| with
// f ~ 4e-3), so the roundings here move either side by < 1e-4 of s n[j], which the 0.1 % on
// f in argmax() covers.
inline bool screen(const float* a, const float* n, int64_t V, float s, std::vector<int64_t>& cand) {
  const __m512 sv = _mm512_set1_ps(s);
  __m512 lower = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) {
    const __m512 av = _mm512_loadu_ps(a + j);
    nan |= _mm512_cmp_ps_mask(av, av, _CMP_UNORD_Q);
    lower = _mm512_max_ps(lower, _mm512_fnmadd_ps(sv, _mm512_loadu_ps(n + j), av));
  }
  float low = _mm512_reduce_max_ps(lower);
  for (int64_t i = j; i < V; ++i) {
    if (std::isnan(a[i])) nan = 1;
    low = std::max(low, a[i] - s * n[i]);
  }
  if (nan) return false;
  const __m512 lv = _mm512_set1_ps(low);
  for (j = 0; j + 16 <= V; j += 16) {
    __mmask16 hit = _mm512_cmp_ps_mask(
        _mm512_fmadd_ps(sv, _mm512_loadu_ps(n + j), _mm512_loadu_ps(a + j)), lv, _CMP_GE_OQ);
    while (hit) {
      cand.push_back(j + __builtin_ctz(hit));
      hit &= hit - 1;
    }
  }
  for (int64_t i = j; i < V; ++i)
    if (a[i] + s * n[i] >= low) cand.push_back(i);
  return true;
}
#else
inline bool screen(const float*, const float*, int64_t, float, std::vector<int64_t>&) {
  return false;
}
#endif

// f of the bound E = f ||x|| ||W_j|| for K-long rows (see the top of this file), with 0.1 %
// for the screen's float comparisons.
double bound_factor(int64_t K) {
  const double u = std::ldexp(1.0, -9);
  return (2 * u + u * u + 3.0 * K * std::ldexp(1.0, -23)) * 1.001;
}

// Logit j as panel_gemm computes it from its panels: k in order, fused multiply-adds from
// zero, so the same bits.
inline float exact_logit(const float* x, const float* panels, int64_t K, int64_t j) {
  const float* w = panels + (j / kCols) * K * kCols + j % kCols;
  float acc = 0.f;
  for (int64_t k = 0; k < K; ++k) acc = std::fma(x[k], w[k * kCols], acc);
  return acc;
}

// x [B, K] float32; packed, norms = pack(panels, V); panels: panel_gemm's float32 panels of
// the same weight. Returns int64 [B]: each row's greedy token (see the top of this file), -1
// where undecided.
torch::Tensor argmax(const torch::Tensor& x_in, const torch::Tensor& packed,
                     const torch::Tensor& norms, const torch::Tensor& panels) {
  RECORD_FUNCTION("plait::greedy_head", std::vector<c10::IValue>({x_in}));
  TORCH_CHECK(available(), "greedy_head: needs AVX-512 BF16");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat32,
              "greedy_head.argmax: x must be float32 [B, K]");
  const torch::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1), V = norms.numel(), P = packed.size(0);
  TORCH_CHECK(panels.dim() == 3 && panels.size(0) == P && panels.size(1) == K &&
                  panels.size(2) == kCols && panels.is_contiguous() &&
                  panels.scalar_type() == torch::kFloat32 && packed.dim() == 4 &&
                  packed.size(1) * 2 == K && packed.size(2) == kCols && packed.size(3) == 2 &&
                  packed.scalar_type() == torch::kInt16 && packed.is_contiguous() &&
                  P == (V + kCols - 1) / kCols && norms.scalar_type() == torch::kFloat32,
              "greedy_head.argmax: x [B, K] and packed, norms = pack(panels, V) of panels "
              "[P, K, 48]");
  torch::Tensor ids = torch::full({B}, -1, torch::kInt64);
  if (B == 0) return ids;
  const int64_t half_k = K / 2;
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* np = norms.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();

  // each row's bound factor f * ||x_b|| (rounded up); rows with a non-finite one stay -1
  const double f = bound_factor(K);
  std::vector<float> scale(B);
  std::vector<uint32_t> xb(B * half_k);
  std::vector<char> live(B);
  for (int64_t b = 0; b < B; ++b) {
    double sq = 0;
    for (int64_t k = 0; k < K; ++k) sq += static_cast<double>(xp[b * K + k]) * xp[b * K + k];
    const double s = f * std::sqrt(sq);
    live[b] = std::isfinite(s) && s < 1e30;
    scale[b] = live[b] ? std::nextafter(static_cast<float>(s), 1e38f) : 0.f;
    for (int64_t k = 0; k < half_k; ++k) {
      const float lo = live[b] ? xp[b * K + 2 * k] : 0.f, hi = live[b] ? xp[b * K + 2 * k + 1] : 0.f;
      xb[b * half_k + k] = static_cast<uint32_t>(to_bf16(lo)) |
                           (static_cast<uint32_t>(to_bf16(hi)) << 16);
    }
  }

  // the screen: approx [B, P * 48]
  // every element is written by the tiles: no zeroing ([64, 49152] floats would be 12.6 MB of
  // memset a step)
  std::unique_ptr<float[]> approx(new float[B * P * kCols]);
  const uint16_t* pp = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  const int64_t ldy = P * kCols;
#if defined(__AVX512F__)
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b0 = 0; b0 < B; b0 += kRows)
        tile_rows<kRows>(std::min(kRows, B - b0), xb.data() + b0 * half_k, half_k,
                         pp + p * half_k * kCols * 2, approx.get() + b0 * ldy + p * kCols, ldy);
  });
#endif

  // per row: the threshold, the candidates, their exact logits
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cand;
    for (int64_t b = b0; b < b1; ++b) {
      if (!live[b]) continue;
      const float* a = approx.get() + b * ldy;
      const float s = scale[b];
      cand.clear();
      bool ok = screen(a, np, V, s, cand);
      float best = -std::numeric_limits<float>::infinity();
      int64_t best_j = -1;
      ok = ok && !cand.empty();
      for (int64_t j : cand) {
        const float v = exact_logit(xp + b * K, wp, K, j);
        if (!std::isfinite(v)) {
          ok = false;
          break;
        }
        if (v > best) best = v, best_j = j;
      }
      ip[b] = ok ? best_j : -1;
    }
  });
  return ids;
}

}  // namespace greedy_head
