// Weight-only quantized matmul y[M, N] = x[M, K] @ W[N, K]^T for plait.quant.formats'
// QuantizedWeight: 8-bit codes, or 4-bit codes in GGUF nibble order with (Q4_1) or without
// (Q4_0) per-group mins; float16 scales per group of `group` inputs.
//
// Each 32-weight block is dequantized in registers (q * scale (+ min), exact in float32) and
// multiplied against up to 8 activation rows at once, so a block is unpacked once per 8 rows
// of x. Output rows are split across threads with at::parallel_for (torch's OpenMP pool,
// sized by torch.set_num_threads). Built with -mavx2 -mfma -mf16c where the CPU has them
// (plait/backends/cpu/qmatmul.py decides); otherwise the portable loop below is compiled.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PLAIT_AVX2 1
#endif

namespace {

constexpr int kBlock = 32;
constexpr int kMaxRows = 8;  // activation rows per register tile

struct Weight {
  const uint8_t* qs;      // row-major, row stride qs_stride bytes
  int64_t qs_stride;
  const c10::Half* scales;  // [N, K / group]
  const c10::Half* mins;    // same, or nullptr
  int64_t groups;
  int64_t group;
  int bits;
};

#ifdef PLAIT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(c10::Half h) { return _cvtsh_ss(h.x); }

// The 32 weights of block `b` of one row, as 4 x 8 floats.
template <int BITS, bool MINS>
inline void dequant_block(const uint8_t* row, int64_t b, __m256 d, __m256 m, __m256 out[4]) {
  __m128i c[4];
  if constexpr (BITS == 8) {
    const int8_t* p = reinterpret_cast<const int8_t*>(row) + b * kBlock;
    for (int i = 0; i < 4; ++i) c[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock / 2));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(raw, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    if constexpr (!MINS) {
      lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
      hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
    }
    c[0] = lo; c[1] = _mm_srli_si128(lo, 8); c[2] = hi; c[3] = _mm_srli_si128(hi, 8);
  }
  if constexpr (MINS) {
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c[i])), d, m);
  } else {
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c[i])), d);
  }
}

// y[m, n] for MT activation rows and one weight row n. Few rows get several accumulators
// each so the FMA chains overlap; 8 rows already give 8 independent chains.
template <int BITS, bool MINS, int MT>
inline void row_tile(const Weight& w, int64_t n, const float* x, int64_t ldx,
                     float* y, int64_t ldy) {
  constexpr int NA = MT <= 2 ? 4 : (MT <= 4 ? 2 : 1);
  __m256 acc[MT][NA];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
  const uint8_t* row = w.qs + n * w.qs_stride;
  const c10::Half* srow = w.scales + n * w.groups;
  const c10::Half* mrow = MINS ? w.mins + n * w.groups : nullptr;
  const int64_t per_group = w.group / kBlock;
  __m256 wv[4];
  __m256 mn = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const __m256 d = _mm256_set1_ps(half_to_float(srow[g]));
    if constexpr (MINS) mn = _mm256_set1_ps(half_to_float(mrow[g]));
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      dequant_block<BITS, MINS>(row, b, d, mn, wv);
      for (int m = 0; m < MT; ++m) {
        const float* xp = x + m * ldx + b * kBlock;
        for (int i = 0; i < 4; ++i)
          acc[m][i % NA] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xp + 8 * i), acc[m][i % NA]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[m][a]);
    y[m * ldy + n] = hsum(s);
  }
}

template <int BITS, bool MINS>
void rows_kernel(const Weight& w, int64_t n0, int64_t n1, int64_t M, int64_t K, const float* x,
                 float* y, int64_t N) {
  // Weight row outer, activation tiles inner: a row is read from memory once and stays in
  // L1 for the next tile.
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t mt = std::min<int64_t>(kMaxRows, M - m0);
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      switch (mt) {
        case 1: row_tile<BITS, MINS, 1>(w, n, xm, K, ym, N); break;
        case 2: row_tile<BITS, MINS, 2>(w, n, xm, K, ym, N); break;
        case 3: row_tile<BITS, MINS, 3>(w, n, xm, K, ym, N); break;
        case 4: row_tile<BITS, MINS, 4>(w, n, xm, K, ym, N); break;
        case 5: row_tile<BITS, MINS, 5>(w, n, xm, K, ym, N); break;
        case 6: row_tile<BITS, MINS, 6>(w, n, xm, K, ym, N); break;
        case 7: row_tile<BITS, MINS, 7>(w, n, xm, K, ym, N); break;
        default: row_tile<BITS, MINS, 8>(w, n, xm, K, ym, N); break;
      }
    }
  }
}
#else
// Portable: dequantize one weight row into a buffer, then plain dot products.
template <int BITS, bool MINS>
void rows_kernel(const Weight& w, int64_t n0, int64_t n1, int64_t M, int64_t K, const float* x,
                 float* y, int64_t N) {
  std::vector<float> buf(K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.qs + n * w.qs_stride;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / w.group;
      const float d = static_cast<float>(w.scales[n * w.groups + g]);
      float q;
      if constexpr (BITS == 8) {
        q = static_cast<float>(reinterpret_cast<const int8_t*>(row)[k]);
      } else {
        const int64_t b = k / kBlock, j = k % kBlock;
        const uint8_t byte = row[b * kBlock / 2 + (j & 15)];
        q = static_cast<float>(j < 16 ? (byte & 0x0F) : (byte >> 4)) - (MINS ? 0.f : 8.f);
      }
      buf[k] = MINS ? q * d + static_cast<float>(w.mins[n * w.groups + g]) : q * d;
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * buf[k];
      y[m * N + n] = s;
    }
  }
}
#endif

}  // namespace

torch::Tensor qmatmul(torch::Tensor x, torch::Tensor qs, torch::Tensor scales,
                      c10::optional<torch::Tensor> mins, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 [M, K]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales");
  TORCH_CHECK(qs.is_contiguous() && (bits == 4 || bits == 8), "qs / bits");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  TORCH_CHECK(K % kBlock == 0 && K % group == 0 && group % kBlock == 0, "K / group");
  TORCH_CHECK(qs.size(1) == (bits == 4 ? K / 2 : K) && scales.size(1) == K / group,
              "weight does not match x's K");
  const bool has_mins = mins.has_value() && mins->defined();
  if (has_mins) TORCH_CHECK(bits == 4 && mins->is_contiguous(), "mins");
  Weight w{static_cast<const uint8_t*>(qs.data_ptr()), qs.size(1),
           reinterpret_cast<const c10::Half*>(scales.data_ptr()),
           has_mins ? reinterpret_cast<const c10::Half*>(mins->data_ptr()) : nullptr,
           K / group, group, static_cast<int>(bits)};
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~64K weights per task: small matrices stay on one thread, large ones split evenly.
  const int64_t grain = std::max<int64_t>(1, 65536 / K);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (bits == 8) rows_kernel<8, false>(w, n0, n1, M, K, xp, yp, N);
    else if (has_mins) rows_kernel<4, true>(w, n0, n1, M, K, xp, yp, N);
    else rows_kernel<4, false>(w, n0, n1, M, K, xp, yp, N);
  });
  return y;
}

bool simd() {
#ifdef PLAIT_AVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "weight-only quantized matmul (see plait/quant/formats.py)");
  m.def("simd", &simd, "whether the AVX2/FMA/F16C path was compiled");
}
