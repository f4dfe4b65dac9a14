// Weight-only quantized matmul y[M, N] = x[M, K] @ W[N, K]^T for plait.quant.formats'
// QuantizedWeight: 8-bit codes, or 4-bit codes in GGUF nibble order with (Q4_1) or without
// (Q4_0) per-group mins; float16 scales per group of `group` inputs.
//
// Each 32-weight block is dequantized in registers (q * scale (+ min), exact in float32) and
// multiplied against up to 8 activation rows at once, so a block is unpacked once per 8 rows
// of x. Output rows are split across threads with at::parallel_for (torch's OpenMP pool,
// sized by torch.set_num_threads). Built with -mavx2 -mfma -mf16c where the CPU has them
// (plait/backends/cpu/cpp_build.py decides); otherwise the portable loop below is compiled.
//
// Built with AVX-512 VNNI as well (cpp_build.py's "avx512vnni" level), the module also has
// qmatmul_q8: activations quantized to int8 per 32-block (GGUF's Q8 activation
// scheme, llama.cpp's), products summed in int32 by vpdpbusd, two blocks per instruction. See
// that function for its arithmetic and error bound.
#include "plait_cpu/qmatmul.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "plait_cpu/simd.h"

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

// A block's 32 weights as AVX2 registers: four ymm of 8 floats (rows_tile's vector type).
struct Ymm {
  using V = __m256;
  static constexpr int kPerBlock = 4;
  static constexpr int kTileRows = 1;  // 16 registers: a 1 x 8 tile already uses 13
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) { return hsum(v); }
  template <int BITS, bool MINS>
  static void dequant(const uint8_t* row, int64_t b, V d, V m, V out[kPerBlock]) {
    dequant_block<BITS, MINS>(row, b, d, m, out);
  }
};

#ifdef __AVX512F__
// Builds with AVX-512 (the avx512vnni level) run rows_tile on zmm: a 4-bit block dequantizes
// into two zmm by table lookup and each row's FMAs are 512 bits wide, about half the
// instructions of the AVX2 tile. Same products, other summation order.
template <int BITS, bool MINS>
inline void dequant_block16(const uint8_t* row, int64_t b, __m512 d, __m512 m, __m512 out[2]) {
  if constexpr (BITS == 8) {
    const uint8_t* p = row + b * kBlock;
    for (int i = 0; i < 2; ++i) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i));
      out[i] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), d);
    }
  } else {
    // The block's 16 possible weights, code * d (+ m) for codes 0..15 (Q4_0: code - 8), as
    // one zmm; vpermps then looks each weight up by its nibble (it reads an index's low four
    // bits only, so the high nibble needs one shift and neither needs a mask). Same floats as
    // converting each code, in 6 instructions a block instead of 10.
    const __m512 codes = MINS ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                               14, 15)
                              : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4,
                                               5, 6, 7);
    const __m512 table = MINS ? _mm512_fmadd_ps(codes, d, m) : _mm512_mul_ps(codes, d);
    const __m512i bytes = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock / 2)));
    out[0] = _mm512_permutexvar_ps(bytes, table);                          // low nibbles
    out[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);   // high nibbles
  }
}

// A block's 32 weights as AVX-512 registers: two zmm of 16 floats.
struct Zmm {
  using V = __m512;
  static constexpr int kPerBlock = 2;
  static constexpr int kTileRows = 2;  // weight rows per rows_tile: 2 x 8 uses 21 of 32 zmm
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  template <int BITS, bool MINS>
  static void dequant(const uint8_t* row, int64_t b, V d, V m, V out[kPerBlock]) {
    dequant_block16<BITS, MINS>(row, b, d, m, out);
  }
};
using RowLanes = Zmm;
#else
using RowLanes = Ymm;
#endif

// Weight row n dequantized into out[0:K] (float32, as rows_tile computes the weights).
template <int BITS, bool MINS>
inline void dequant_row(const Weight& w, int64_t n, int64_t K, float* out) {
  using L = RowLanes;
  constexpr int kLanes = kBlock / L::kPerBlock;
  const uint8_t* row = w.qs + n * w.qs_stride;
  const int64_t per_group = w.group / kBlock;
  typename L::V wv[L::kPerBlock];
  typename L::V mn = L::zero();
  for (int64_t g = 0; g < w.groups; ++g) {
    const auto d = L::set1(half_to_float(w.scales[n * w.groups + g]));
    if constexpr (MINS) mn = L::set1(half_to_float(w.mins[n * w.groups + g]));
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      L::template dequant<BITS, MINS>(row, b, d, mn, wv);
      for (int i = 0; i < L::kPerBlock; ++i) L::store(out + b * kBlock + kLanes * i, wv[i]);
    }
  }
}

// Scales (and mins) of blocks [b0, b0 + nb) of weight row n, one float per 32-weight block.
// Converted ahead of the block loop so that the loop broadcasts them from memory: converting
// a float16 scale inside it costs three instructions, and with groups of 32 (every GGUF
// format) it happens for every block.
template <bool MINS>
inline void block_scales(const Weight& w, int64_t n, int64_t b0, int64_t nb, float* sd,
                         float* sm) {
  const int64_t per_group = w.group / kBlock;
  const c10::Half* srow = w.scales + n * w.groups;
  const c10::Half* mrow = MINS ? w.mins + n * w.groups : nullptr;
  int64_t j = 0;
  if (per_group == 1) {
    for (; j + 8 <= nb; j += 8) {
      _mm256_storeu_ps(sd + j, _mm256_cvtph_ps(_mm_loadu_si128(
                                   reinterpret_cast<const __m128i*>(srow + b0 + j))));
      if constexpr (MINS)
        _mm256_storeu_ps(sm + j, _mm256_cvtph_ps(_mm_loadu_si128(
                                     reinterpret_cast<const __m128i*>(mrow + b0 + j))));
    }
  }
  // Larger groups (int8 per channel, int4 in groups of 128): one conversion per group.
  int64_t g = (b0 + j) / per_group, left = per_group - (b0 + j) % per_group;
  float d = half_to_float(srow[g]), mn = MINS ? half_to_float(mrow[g]) : 0.f;
  for (; j < nb; ++j) {
    if (left == 0) {
      ++g;
      left = per_group;
      d = half_to_float(srow[g]);
      if constexpr (MINS) mn = half_to_float(mrow[g]);
    }
    sd[j] = d;
    if constexpr (MINS) sm[j] = mn;
    --left;
  }
}

// Blocks whose scales block_scales converts at a time (on the stack: NR x 2 x 256 B).
constexpr int64_t kScaleChunk = 64;

// y[m, n + r] for MT activation rows and NR weight rows n..n+NR-1, in vectors of L (Ymm, or
// Zmm where the build has AVX-512). Each block of a weight row is dequantized once per MT
// activation rows, and each activation vector, once loaded, feeds NR FMAs: with NR = 1 the
// loads pace the FMAs one to one. Few activation rows get NA accumulators each so that the FMA
// chains overlap; NA depends on MT alone, so an output's summation order (and its bits) does
// not depend on NR, i.e. on whether its weight row was tiled with a neighbour. Kept out of
// line: inlined into qmatmul's body, tiles had their accumulators spilled to the stack inside
// the block loop. Used from MT = 3 on (row_tile below serves one or two rows).
template <typename L, int BITS, bool MINS, int NR, int MT>
__attribute__((noinline)) void rows_tile(const Weight& w, int64_t n, const float* x,
                                         int64_t ldx, float* y, int64_t ldy) {
  using V = typename L::V;
  constexpr int kLanes = kBlock / L::kPerBlock;
  constexpr int NA = MT <= 2 ? L::kPerBlock : (MT <= 4 ? L::kPerBlock / 2 : 1);
  V acc[NR][MT][NA];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m)
      for (int a = 0; a < NA; ++a) acc[r][m][a] = L::zero();
  const int64_t blocks = w.groups * (w.group / kBlock);
  float sd[NR][kScaleChunk], sm[NR][kScaleChunk];
  V wv[NR][L::kPerBlock];
  for (int64_t b0 = 0; b0 < blocks; b0 += kScaleChunk) {
    const int64_t nb = std::min(kScaleChunk, blocks - b0);
    for (int r = 0; r < NR; ++r) block_scales<MINS>(w, n + r, b0, nb, sd[r], sm[r]);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t b = b0 + j;
      // The next NR rows, a tile ahead: reading two rows' blocks in turn defeats the hardware
      // prefetcher. Past the last row, a prefetch
      // does not fault.
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w.qs + (n + NR + r) * w.qs_stride +
                                                   b * BITS * kBlock / 8), _MM_HINT_T0);
      for (int r = 0; r < NR; ++r)
        L::template dequant<BITS, MINS>(w.qs + (n + r) * w.qs_stride, b, L::set1(sd[r][j]),
                                        MINS ? L::set1(sm[r][j]) : L::zero(), wv[r]);
      for (int m = 0; m < MT; ++m) {
        const float* xp = x + m * ldx + b * kBlock;
        for (int i = 0; i < L::kPerBlock; ++i) {
          V xv = L::load(xp + kLanes * i);
          // Keep xv in a register: otherwise the compiler folds the load into each of the NR
          // FMAs, and the loads pace the loop again.
          asm("" : "+v"(xv));
          for (int r = 0; r < NR; ++r)
            acc[r][m][i % NA] = L::fmadd(wv[r][i], xv, acc[r][m][i % NA]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) {
      V s = acc[r][m][0];
      for (int a = 1; a < NA; ++a) s = L::add(s, acc[r][m][a]);
      y[m * ldy + n + r] = L::sum(s);
    }
}

// y[m, n] for MT <= 2 activation rows and one weight row n: the decode of one or two
// sequences, where the weights stream from memory: one row at a time keeps the reads
// sequential (the hardware prefetcher follows them; rows_tile's pairs needed a software
// prefetch and were still slower on the LM head), and the tile is too small for rows_tile's
// scale buffer and call to pay. kPerBlock accumulators per activation row let the FMA chains
// overlap. Inlined into the row loop.
template <typename L, int BITS, bool MINS, int MT>
inline void row_tile(const Weight& w, int64_t n, const float* x, int64_t ldx,
                     float* y, int64_t ldy) {
  static_assert(MT <= 2, "larger tiles go through rows_tile");
  using V = typename L::V;
  constexpr int kLanes = kBlock / L::kPerBlock;
  constexpr int NA = L::kPerBlock;
  V acc[MT][NA];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = L::zero();
  const uint8_t* row = w.qs + n * w.qs_stride;
  const c10::Half* srow = w.scales + n * w.groups;
  const c10::Half* mrow = MINS ? w.mins + n * w.groups : nullptr;
  const int64_t per_group = w.group / kBlock;
  V wv[L::kPerBlock];
  V mn = L::zero();
  for (int64_t g = 0; g < w.groups; ++g) {
    const V d = L::set1(half_to_float(srow[g]));
    if constexpr (MINS) mn = L::set1(half_to_float(mrow[g]));
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      L::template dequant<BITS, MINS>(row, b, d, mn, wv);
      for (int m = 0; m < MT; ++m) {
        const float* xp = x + m * ldx + b * kBlock;
        for (int i = 0; i < L::kPerBlock; ++i)
          acc[m][i] = L::fmadd(wv[i], L::load(xp + kLanes * i), acc[m][i]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    V s = acc[m][0];
    for (int a = 1; a < NA; ++a) s = L::add(s, acc[m][a]);
    y[m * ldy + n] = L::sum(s);
  }
}

// Weight rows from n (advanced past the last whole group of NR) to n1 times one tile of
// 3 <= mt <= kMaxRows activation rows.
template <int BITS, bool MINS, int NR>
inline void tile_rows_nr(const Weight& w, int64_t& n, int64_t n1, int64_t mt, const float* x,
                         int64_t K, float* y, int64_t N) {
  for (; n + NR <= n1; n += NR) {
    switch (mt) {
      case 3: rows_tile<RowLanes, BITS, MINS, NR, 3>(w, n, x, K, y, N); break;
      case 4: rows_tile<RowLanes, BITS, MINS, NR, 4>(w, n, x, K, y, N); break;
      case 5: rows_tile<RowLanes, BITS, MINS, NR, 5>(w, n, x, K, y, N); break;
      case 6: rows_tile<RowLanes, BITS, MINS, NR, 6>(w, n, x, K, y, N); break;
      case 7: rows_tile<RowLanes, BITS, MINS, NR, 7>(w, n, x, K, y, N); break;
      default: rows_tile<RowLanes, BITS, MINS, NR, 8>(w, n, x, K, y, N); break;
    }
  }
}

// Weight rows [n0, n1) times one tile of mt <= kMaxRows activation rows.
template <int BITS, bool MINS>
inline void tile_rows(const Weight& w, int64_t n0, int64_t n1, int64_t mt, const float* x,
                      int64_t K, float* y, int64_t N) {
  if (mt == 1) {
    for (int64_t n = n0; n < n1; ++n) row_tile<RowLanes, BITS, MINS, 1>(w, n, x, K, y, N);
    return;
  }
  if (mt == 2) {
    for (int64_t n = n0; n < n1; ++n) row_tile<RowLanes, BITS, MINS, 2>(w, n, x, K, y, N);
    return;
  }
  int64_t n = n0;
  if constexpr (RowLanes::kTileRows > 1)
    tile_rows_nr<BITS, MINS, RowLanes::kTileRows>(w, n, n1, mt, x, K, y, N);
  tile_rows_nr<BITS, MINS, 1>(w, n, n1, mt, x, K, y, N);
}

// Weight rows in chunks of kChunkRows; within a chunk, activation tiles outer and weight rows
// inner: one tile of x (kMaxRows x K floats, 18 KB at K = 576) stays in L1 while the chunk's
// rows (a few KB of codes) pass over it, instead of every tile of x being re-read from L2 for
// every weight row.
constexpr int64_t kChunkRows = 32;

template <int BITS, bool MINS>
void rows_kernel(const Weight& w, int64_t n0, int64_t n1, int64_t M, int64_t K, const float* x,
                 float* y, int64_t N) {
  for (int64_t c0 = n0; c0 < n1; c0 += kChunkRows) {
    const int64_t c1 = std::min(n1, c0 + kChunkRows);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t mt = std::min<int64_t>(kMaxRows, M - m0);
      tile_rows<BITS, MINS>(w, c0, c1, mt, x + m0 * K, K, y + m0 * N, N);
    }
  }
}
#else
// Portable: dequantize one weight row into a buffer, then plain dot products.
template <int BITS, bool MINS>
inline void dequant_row(const Weight& w, int64_t n, int64_t K, float* out) {
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
    out[k] = MINS ? q * d + static_cast<float>(w.mins[n * w.groups + g]) : q * d;
  }
}

template <int BITS, bool MINS>
void rows_kernel(const Weight& w, int64_t n0, int64_t n1, int64_t M, int64_t K, const float* x,
                 float* y, int64_t N) {
  std::vector<float> buf(K);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row<BITS, MINS>(w, n, K, buf.data());
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * buf[k];
      y[m * N + n] = s;
    }
  }
}
#endif

#ifdef PLAIT_VNNI
// ---- int8 activations, VNNI dot products -------------------------------------------------
//
// Every weight block is read as 32 unsigned codes u with value  d_w * u + c_w  (per block):
//   Q4_1: u = q,        c_w = min           Q4_0: u = q,       c_w = -8 * d_w
//   int8: u = q + 128,  c_w = -128 * d_w     (the code's sign bit flipped)
// and every activation block as 32 signed codes v = round(x / d_x), d_x = amax / 127. So
//   sum_k w_k x_k  ~=  sum_blocks  d_w d_x * sum(u v)  +  c_w * (d_x * sum(v))
// where sum(u v) is exact in int32 (vpdpbusd: u8 x s8, four products per lane) and the only
// error is x's rounding, |x - d_x v| <= d_x / 2 per element.

constexpr int kPairBytes = 2 * kBlock;  // one zmm of codes = two blocks

// x quantized once per call, row by row; rows are zero-padded to whole block pairs, so a pair
// load never leaves the row and padding contributes 0 to every sum.
struct QuantizedActivations {
  int64_t pairs, rows_padded, blocks_padded;
  std::vector<int8_t> codes;  // [M, pairs * 64]
  std::vector<float> scales;  // [M, pairs * 16]: d_x of block b repeated in lanes 8b..8b+7
  std::vector<float> sums;    // [blocks, rows_padded]: d_x * sum(v) of (block, row); rows
                              // 0-padded to a multiple of 8, so 8 rows load as one ymm
  std::vector<float> row_sums_;  // the same, [M, blocks_padded], blocks 0-padded to 16

  const int8_t* row_codes(int64_t m) const { return codes.data() + m * pairs * kPairBytes; }
  const float* row_scales(int64_t m) const { return scales.data() + m * pairs * 16; }
  const float* block_sums(int64_t b) const { return sums.data() + b * rows_padded; }
  const float* row_sums(int64_t m) const { return row_sums_.data() + m * blocks_padded; }
};

QuantizedActivations quantize_activations(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kBlock;
  QuantizedActivations q;
  q.pairs = (blocks + 1) / 2;
  q.rows_padded = (M + 7) / 8 * 8;
  q.blocks_padded = (blocks + 15) / 16 * 16;
  q.row_sums_.assign(M * q.blocks_padded, 0.f);
  q.codes.assign(M * q.pairs * kPairBytes, 0);
  q.scales.assign(M * q.pairs * 16, 0.f);
  q.sums.assign(blocks * q.rows_padded, 0.f);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const float* src = x + m * K + b * kBlock;
        const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0),
                                                              _mm512_abs_ps(v1)));
        const float d = amax / 127.f;
        const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
        // round to nearest even (the default MXCSR mode), as torch.round does
        const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
        const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        int8_t* dst = q.codes.data() + m * q.pairs * kPairBytes + b * kBlock;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(c0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(c1));
        _mm256_storeu_ps(q.scales.data() + m * q.pairs * 16 + b * 8, _mm256_set1_ps(d));
        const float sum =
            d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1)));
        q.sums[b * q.rows_padded + m] = sum;
        q.row_sums_[m * q.blocks_padded + b] = sum;
      }
    }
  });
  return q;
}

// The unsigned codes of blocks 2p and 2p + 1 of a weight row (block 2p in the low 32 bytes).
// A missing second block (odd block count) is read with a masked load, which never faults.
template <int BITS>
inline __m512i weight_pair(const uint8_t* row, int64_t p, bool has_second) {
  if constexpr (BITS == 8) {
    const uint8_t* src = row + p * kPairBytes;
    const __m512i v = has_second ? _mm512_loadu_si512(src)
                                 : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, src);
    return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const uint8_t* src = row + p * kBlock;  // 16 bytes per block
    const __m256i raw = has_second ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                                   : _mm256_maskz_loadu_epi8(0xFFFF, src);
    __m512i z = _mm512_castsi256_si512(raw);
    z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(1, 1, 0, 0));  // bytes of [b0, b0, b1, b1]
    z = _mm512_mask_srli_epi16(z, 0xFF00FF00u, z, 4);          // high nibbles: weights 16..31
    return _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
  }
}

// Per weight row: d_w and c_w of every block, as floats (converted once per row and call).
template <int BITS, bool MINS>
struct RowScales {
  std::vector<float> scales;   // [pairs * 2]; 0 past the last block
  std::vector<float> offsets;  // [blocks_padded]; 0 past the last block

  RowScales(int64_t pairs, int64_t blocks_padded) : scales(pairs * 2, 0.f),
                                                    offsets(blocks_padded, 0.f) {}

  void load(const Weight& w, int64_t n) {
    const int64_t per_group = w.group / kBlock;
    int64_t g = 0;
    if (per_group == 1) {  // GGUF's blocks: 16 groups per conversion (a scalar loop here
                           // cost as much as the row's dot products at M = 1)
      const c10::Half* s = w.scales + n * w.groups;
      const c10::Half* mn = MINS ? w.mins + n * w.groups : nullptr;
      const __m512 bias = _mm512_set1_ps(BITS == 8 ? -128.f : -8.f);
      for (; g + 16 <= w.groups; g += 16) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(s + g)));
        const __m512 c = MINS ? _mm512_cvtph_ps(_mm256_loadu_si256(
                                    reinterpret_cast<const __m256i*>(mn + g)))
                              : _mm512_mul_ps(bias, d);
        _mm512_storeu_ps(scales.data() + g, d);
        _mm512_storeu_ps(offsets.data() + g, c);
      }
    }
    for (; g < w.groups; ++g) {
      const float d = _cvtsh_ss(w.scales[n * w.groups + g].x);
      const float c = MINS ? _cvtsh_ss(w.mins[n * w.groups + g].x)
                           : (BITS == 8 ? -128.f : -8.f) * d;
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        scales[b] = d;
        offsets[b] = c;
      }
    }
  }

  // d_w of block 2p in lanes 0..7, of block 2p + 1 in lanes 8..15
  __m512 pair(int64_t p) const {
    return _mm512_insertf32x8(_mm512_set1_ps(scales[2 * p]),
                              _mm256_set1_ps(scales[2 * p + 1]), 1);
  }
};

inline float dot_padded(const float* a, const float* b, int64_t n) {  // n % 16 == 0
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

// The 8 horizontal sums of a[0..7] as one vector (lane m = sum of a[m]'s 16 lanes).
inline __m256 sums8(const __m512 a[8]) {
  __m256 h[8];
  for (int i = 0; i < 8; ++i)
    h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
  const __m256 t0 = _mm256_hadd_ps(h[0], h[1]), t1 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 t2 = _mm256_hadd_ps(h[4], h[5]), t3 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// y[m0 .. m0+MT, n0 .. n0+NR]: each pair of weight blocks is unpacked once for MT activation
// rows, and each activation pair is loaded once for NR weight rows.
template <int BITS, bool MINS, int NR, int MT>
void q8_tile(const Weight& w, const RowScales<BITS, MINS>* rs, int64_t n0, int64_t blocks,
             const QuantizedActivations& xq, int64_t m0, float* y, int64_t N) {
  __m512 acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  // Prefetch the weight rows two tiles ahead, spread over this tile's pairs: a row is only
  // 5-9 cache lines, too short for the hardware prefetcher to run ahead of (at M = 1 the
  // kernel otherwise waits on memory). Prefetches never fault, so
  // reading past the matrix's end is harmless.
  const char* ahead = reinterpret_cast<const char*>(w.qs + (n0 + 2 * NR) * w.qs_stride);
  const int64_t ahead_lines = (NR * w.qs_stride + 63) / 64;
  const int64_t lines_per_pair = (ahead_lines + xq.pairs - 1) / xq.pairs;
  for (int64_t p = 0; p < xq.pairs; ++p) {
    for (int64_t l = p * lines_per_pair; l < std::min(ahead_lines, (p + 1) * lines_per_pair); ++l)
      _mm_prefetch(ahead + l * 64, _MM_HINT_T0);
    const bool second = 2 * p + 1 < blocks;
    __m512i wv[NR];
    __m512 ws[NR];
    for (int r = 0; r < NR; ++r) {
      wv[r] = weight_pair<BITS>(w.qs + (n0 + r) * w.qs_stride, p, second);
      ws[r] = rs[r].pair(p);
    }
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq.row_codes(m0 + m) + p * kPairBytes);
      const __m512 xd = _mm512_loadu_ps(xq.row_scales(m0 + m) + p * 16);
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(zero, wv[r], xv);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws[r], xd),
                                    acc[r][m]);
      }
    }
  }
  // y = sum of the accumulator's lanes + sum_b c_w[b] * (d_x sum(v))[b, m]: row by row for
  // one or two rows, else 8 rows at once (one transposing reduction, one ymm per block)
  if constexpr (MT <= 2) {
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m)
        y[(m0 + m) * N + n0 + r] =
            _mm512_reduce_add_ps(acc[r][m]) +
            dot_padded(rs[r].offsets.data(), xq.row_sums(m0 + m), xq.blocks_padded);
    return;
  }
  alignas(32) float out[8];
  for (int r = 0; r < NR; ++r) {
    __m256 offset = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b)
      offset = _mm256_fmadd_ps(_mm256_set1_ps(rs[r].offsets[b]),
                               _mm256_loadu_ps(xq.block_sums(b) + m0), offset);
    __m512 a[8];
    for (int m = 0; m < 8; ++m) a[m] = m < MT ? acc[r][m] : _mm512_setzero_ps();
    _mm256_store_ps(out, _mm256_add_ps(sums8(a), offset));
    for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n0 + r] = out[m];
  }
}

template <int BITS, bool MINS, int NR>
void q8_rows(const Weight& w, RowScales<BITS, MINS>* rs, int64_t n0, int64_t blocks,
             const QuantizedActivations& xq, int64_t M, float* y, int64_t N) {
  for (int r = 0; r < NR; ++r) rs[r].load(w, n0 + r);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    switch (std::min<int64_t>(kMaxRows, M - m0)) {
      case 1: q8_tile<BITS, MINS, NR, 1>(w, rs, n0, blocks, xq, m0, y, N); break;
      case 2: q8_tile<BITS, MINS, NR, 2>(w, rs, n0, blocks, xq, m0, y, N); break;
      case 3: q8_tile<BITS, MINS, NR, 3>(w, rs, n0, blocks, xq, m0, y, N); break;
      case 4: q8_tile<BITS, MINS, NR, 4>(w, rs, n0, blocks, xq, m0, y, N); break;
      case 5: q8_tile<BITS, MINS, NR, 5>(w, rs, n0, blocks, xq, m0, y, N); break;
      case 6: q8_tile<BITS, MINS, NR, 6>(w, rs, n0, blocks, xq, m0, y, N); break;
      case 7: q8_tile<BITS, MINS, NR, 7>(w, rs, n0, blocks, xq, m0, y, N); break;
      default: q8_tile<BITS, MINS, NR, 8>(w, rs, n0, blocks, xq, m0, y, N); break;
    }
  }
}

// Weight rows [n0, n1) in tiles of NR (then single rows): with few activation rows, 4 weight
// rows give the FMA chains independent work; with up to 8, 2 x 8 accumulators still leave
// room for the operands in the 32 zmm registers.
template <int BITS, bool MINS>
void q8_kernel(const Weight& w, int64_t n0, int64_t n1, int64_t blocks,
               const QuantizedActivations& xq, int64_t M, float* y, int64_t N) {
  std::vector<RowScales<BITS, MINS>> rs(4, RowScales<BITS, MINS>(xq.pairs, xq.blocks_padded));
  int64_t n = n0;
  if (M <= 2)
    for (; n + 4 <= n1; n += 4) q8_rows<BITS, MINS, 4>(w, rs.data(), n, blocks, xq, M, y, N);
  for (; n + 2 <= n1; n += 2) q8_rows<BITS, MINS, 2>(w, rs.data(), n, blocks, xq, M, y, N);
  if (n < n1) q8_rows<BITS, MINS, 1>(w, rs.data(), n, blocks, xq, M, y, N);
}
#endif  // PLAIT_VNNI

// Checks x [M, K] float32 against the weight's shapes and views the weight's tensors.
inline Weight checked_weight(torch::Tensor& x, const torch::Tensor& qs,
                            const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 [M, K]");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales");
  TORCH_CHECK(qs.is_contiguous() && (bits == 4 || bits == 8), "qs / bits");
  x = x.contiguous();
  const int64_t K = x.size(1);
  TORCH_CHECK(K % kBlock == 0 && K % group == 0 && group % kBlock == 0, "K / group");
  TORCH_CHECK(qs.size(1) == (bits == 4 ? K / 2 : K) && scales.size(1) == K / group,
              "weight does not match x's K");
  const bool has_mins = mins.has_value() && mins->defined();
  if (has_mins) TORCH_CHECK(bits == 4 && mins->is_contiguous(), "mins");
  return Weight{static_cast<const uint8_t*>(qs.data_ptr()), qs.size(1),
                reinterpret_cast<const c10::Half*>(scales.data_ptr()),
                has_mins ? reinterpret_cast<const c10::Half*>(mins->data_ptr()) : nullptr,
                K / group, group, static_cast<int>(bits)};
}

// ~64K weights per task: small matrices stay on one thread, large ones split evenly.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(2, 65536 / K); }

// From this many activation rows on, qmatmul dequantizes the weights into float32 panels and
// multiplies them with oneDNN's float32 GEMM: the register tiles dequantize every block once
// per 8 activation rows and keep one rate however many rows come, while the library GEMM's
// grows with M. Below kPanelMinRows rows the register tiles win: the panels' cost for
// dequantizing the whole matrix, the LM head's weights included, stays while the GEMM shrinks
// (benchmarks/kernels/qmatmul_cpu.py --rows 128 256; the figures are in docs/cpu-backend.md).
// The panel holds the float32 weights the tiles compute, so results differ by
// summation order only.
constexpr int64_t kPanelMinRows = 128;
// Floats per panel (16 MiB): a small model's matrices fit whole, so the GEMM runs once over
// all N and writes y itself; a larger one's go in panels of kPanelFloats / K weight rows. The
// dequantized panel is written and read back once per call, a small part of the GEMM's time;
// smaller, L2-sized panels made the GEMM repack x for each one and ran slower.
constexpr int64_t kPanelFloats = int64_t{1} << 22;

// oneDNN's float32 linear (mkldnn::_linear_pointwise), where this torch has it: y = x @ w^T
// (+ bias) for a weight prepacked by mkldnn::_reorder_linear_weight or a plain row-major
// [N, K] one. The layer step's packed Linears call it too.
inline const c10::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const c10::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
  return op;
}

}  // namespace

namespace qmatmul {

torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& w,
                            const c10::optional<torch::Tensor>& bias) {
  const auto& op = onednn_linear_op();
  TORCH_CHECK(op.has_value(), "this torch has no oneDNN (mkldnn::_linear_pointwise)");
  std::vector<c10::IValue> stack{x, w, bias.has_value() ? c10::IValue(*bias) : c10::IValue(),
                                 std::string("none"),
                                 c10::List<c10::optional<at::Scalar>>(), c10::IValue()};
  op->callBoxed(&stack);
  return stack[0].toTensor();
}

namespace {

// y = x @ w^T in float32 for a plain row-major w [N, K]: oneDNN, faster than at::mm (MKL's
// sgemm) at prefill sizes; at::mm where torch has no oneDNN.
torch::Tensor float_gemm(const torch::Tensor& x, const torch::Tensor& w) {
  return onednn_linear_op().has_value() ? onednn_linear(x, w) : at::mm(x, w.t());
}

// A per-thread scratch of at least `floats` floats, kept between calls: a fresh multi-MiB
// allocation would be page-faulted in on every product.
float* panel_scratch(int64_t floats) {
  thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < floats) scratch.resize(floats);
  return scratch.data();
}

torch::Tensor qmatmul_panels(const Weight& w, const torch::Tensor& x, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t panel_rows = std::min(N, std::max<int64_t>(1, kPanelFloats / K));
  float* pp = panel_scratch(panel_rows * K);
  torch::Tensor y;
  if (panel_rows < N) y = torch::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, N - n0);
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (w.bits == 8) dequant_row<8, false>(w, n0 + r, K, pp + r * K);
        else if (w.mins) dequant_row<4, true>(w, n0 + r, K, pp + r * K);
        else dequant_row<4, false>(w, n0 + r, K, pp + r * K);
      }
    });
    const torch::Tensor panel = torch::from_blob(pp, {rows, K}, x.options());
    torch::Tensor out = float_gemm(x, panel);
    if (panel_rows == N) return out;
    y.narrow(1, n0, rows).copy_(out);
  }
  return y;
}

}  // namespace

torch::Tensor qmatmul(torch::Tensor x, torch::Tensor qs, torch::Tensor scales,
                      c10::optional<torch::Tensor> mins, int64_t bits, int64_t group) {
  const Weight w = checked_weight(x, qs, scales, mins, bits, group);
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  if (M >= kPanelMinRows) return qmatmul_panels(w, x, N);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    if (bits == 8) rows_kernel<8, false>(w, n0, n1, M, K, xp, yp, N);
    else if (w.mins) rows_kernel<4, true>(w, n0, n1, M, K, xp, yp, N);
    else rows_kernel<4, false>(w, n0, n1, M, K, xp, yp, N);
  });
  return y;
}

#ifdef PLAIT_VNNI
// qmatmul with x quantized to int8 per 32-block first (see "int8 activations" above).
torch::Tensor qmatmul_q8(torch::Tensor x, torch::Tensor qs, torch::Tensor scales,
                         c10::optional<torch::Tensor> mins, int64_t bits, int64_t group) {
  const Weight w = checked_weight(x, qs, scales, mins, bits, group);
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0);
  // A prefill (or a decode batch of 128+) takes the float32 panels too: oneDNN's GEMM there
  // is faster than this kernel, and float activations are the more accurate of the two.
  if (M >= kPanelMinRows) return qmatmul_panels(w, x, N);
  const QuantizedActivations xq = quantize_activations(x.data_ptr<float>(), M, K);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t blocks = K / kBlock;
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    if (bits == 8) q8_kernel<8, false>(w, n0, n1, blocks, xq, M, yp, N);
    else if (w.mins) q8_kernel<4, true>(w, n0, n1, blocks, xq, M, yp, N);
    else q8_kernel<4, false>(w, n0, n1, blocks, xq, M, yp, N);
  });
  return y;
}

// x's int8 codes [M, K] and float d_x [M, K / 32], as qmatmul_q8 quantizes them (for tests).
std::vector<torch::Tensor> quantize_activations_q8(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) % kBlock == 0,
              "x must be float32 [M, K], K a multiple of 32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), blocks = K / kBlock;
  const QuantizedActivations xq = quantize_activations(x.data_ptr<float>(), M, K);
  auto codes = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto scales = torch::empty({M, blocks}, x.options());
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(codes.data_ptr<int8_t>() + m * K, xq.row_codes(m), K);
    for (int64_t b = 0; b < blocks; ++b)
      scales.data_ptr<float>()[m * blocks + b] = xq.row_scales(m)[b * 8];
  }
  return {codes, scales};
}
#endif

}  // namespace qmatmul
