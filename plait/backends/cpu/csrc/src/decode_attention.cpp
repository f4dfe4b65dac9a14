// Decode attention over the paged KV pool, reading each request's K/V rows in place.
//
// out[b, j] = softmax(q[b, j] . K[slots[b, :n_b], j / G]^T * scale) @ V[slots[b, :n_b], j / G]
// with G = Hq / Hkv query heads per KV head (GQA, as transformers' repeat_kv pairs them).
//
// Why it is shaped this way (SmolLM2-135M's 9 x 64 heads, 2 cores; the measurements are in
// docs/cpu-backend.md, "Figures quoted in the kernels' comments"):
// - A task is one request's run of consecutive tokens, all heads together, so each token's K
//   and V rows ([Hkv, D], contiguous in the pool) are read whole, once, and the rows of the
//   next tokens are prefetched: slots are indirect, so the hardware prefetcher cannot follow.
// - A request's tokens are split over several tasks when there are fewer requests than threads
//   want work (batch 1 has one request and three KV heads for two threads), each task keeping
//   a running max, sum and weighted V (the online softmax of flash-decoding); a merge step
//   combines them. Blocks of kBlock tokens keep their scores in cache between the two passes.
// - Dot products and V updates run on 16-float vectors (GCC vector extensions: zmm, ymm pairs
//   or SSE quads, as the build's flags allow), reduced to a score with a shuffle tree: an
//   `omp simd` loop that sums each score's 16 lanes one by one reads KV at a fraction of the
//   pool's bandwidth.
// - Requests that share a prefix (the radix cache hands them the same KV slots: a system prompt,
//   a few-shot preamble, SGLang's fork) read it once for all of them (cascade attention): each
//   block of shared keys is transposed into a small [D, kSharedBlock] tile, and every query row
//   of every request in the group (G heads each) takes its scores from it as whole vectors,
//   without the per-score lane sum of the path above. The shared part and each request's own
//   tail are partials merged like the runs above.
// - Tasks differ in size, so threads take them one at a time from a shared counter.
// - K/V are float32 or bfloat16 (a bf16 pool, `--dtype bfloat16`: half the bytes to read);
//   every kernel below is a template on the stored type KV and widens bf16 values to float32
//   as it loads them (bf16::load16), so scores, softmax and the weighted sums are float32
//   either way. q and the output are float32.
#include "plait_cpu/decode_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "plait_cpu/bf16.h"
#include "plait_cpu/simd.h"

namespace decode_attention_detail {

using namespace simd;
using decode_attention::kMinShared;
using decode_attention::SharedGroup;

constexpr int64_t kBlock = 32;       // tokens whose scores are computed before their V pass
                                     // (a multiple of kLanes)
constexpr int64_t kMinChunk = 32;    // fewest tokens worth a task of their own
constexpr int64_t kPrefetchAhead = 4;  // tokens ahead whose K/V rows are prefetched

inline float lane_sum(Vec16 v) {
  const Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float lane_max(Vec16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

template <typename KV>
inline float dot(const float* a, const KV* b, int64_t d) {
  Vec16 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) acc += load16(a + i) * bf16::load16(b + i);
  float s = lane_sum(acc);
  for (; i < d; ++i) s += a[i] * bf16::widen(b[i]);
  return s;
}

// y[0:d] += a * x
template <typename KV>
inline void axpy(float* y, float a, const KV* x, int64_t d) {
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) store16(y + i, load16(y + i) + bf16::load16(x + i) * a);
  for (; i < d; ++i) y[i] += bf16::widen(x[i]) * a;
}

template <typename KV>
inline void prefetch_row(const KV* p, int64_t values) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < values * static_cast<int64_t>(sizeof(KV)); off += 64)
    __builtin_prefetch(c + off, 0, 3);
}

// One task's result for its Hq heads: the running max and sum of exp(score - max), and
// acc = sum of exp(score - max) * v over its tokens.
struct Partial {
  float* m;    // [Hq]
  float* l;    // [Hq]
  float* acc;  // [Hq, D]
};

// One head's block of kBlock scores s: its running max m and sum l updated to include them, s
// replaced by exp(s - m) (padding scores are -inf: their exps are 0). Returns keep =
// exp(old m - new m), the factor the head's weighted-V sum must be rescaled by.
inline float softmax_block(float* s, float& m, float& l) {
  Vec16 block_max = load16(s);
  for (int64_t i = kLanes; i < kBlock; i += kLanes) {
    const Vec16 x = load16(s + i);
    block_max = block_max > x ? block_max : x;
  }
  const float m_new = std::max(m, lane_max(block_max));
  const float keep = std::exp(m - m_new);  // exp(-inf) = 0 on the first block
  m = m_new;
  Vec16 sum = {};
  for (int64_t i = 0; i < kBlock; i += kLanes) {
    const Vec16 e = exp_nonpositive(load16(s + i) - m_new);
    store16(s + i, e);
    sum += e;
  }
  l = l * keep + lane_sum(sum);
  return keep;
}

// Tokens [lo, hi) of one request into `part`.
template <typename KV>
inline void attend_run(const float* q, const KV* kp, const KV* vp, const int64_t* sl,
                       int64_t lo, int64_t hi, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                       float scale, Partial part, std::vector<float>& scores) {
  const int64_t G = Hq / Hkv, row = Hkv * D;
  std::fill(part.m, part.m + Hq, -std::numeric_limits<float>::infinity());
  std::fill(part.l, part.l + Hq, 0.f);
  std::fill(part.acc, part.acc + Hq * D, 0.f);
  scores.resize(static_cast<size_t>(Hq * kBlock));  // [Hq, kBlock]
  for (int64_t t = lo; t < std::min(hi, lo + kPrefetchAhead); ++t) {
    TORCH_CHECK(sl[t] >= 0 && sl[t] < S, "decode_attention: slot out of range");
    prefetch_row(kp + sl[t] * row, row);
    prefetch_row(vp + sl[t] * row, row);
  }
  for (int64_t t0 = lo; t0 < hi; t0 += kBlock) {
    const int64_t nt = std::min(kBlock, hi - t0);
    std::fill(scores.begin(), scores.end(), -std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t t = t0 + i, ahead = t + kPrefetchAhead;
      if (ahead < hi) {
        TORCH_CHECK(sl[ahead] >= 0 && sl[ahead] < S, "decode_attention: slot out of range");
        prefetch_row(kp + sl[ahead] * row, row);
        prefetch_row(vp + sl[ahead] * row, row);
      }
      const KV* k = kp + sl[t] * row;
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t g = 0; g < G; ++g)
          scores[(h * G + g) * kBlock + i] = dot(q + (h * G + g) * D, k + h * D, D) * scale;
    }
    for (int64_t j = 0; j < Hq; ++j) {
      const float keep = softmax_block(scores.data() + j * kBlock, part.m[j], part.l[j]);
      if (keep != 1.f)
        for (int64_t x = 0; x < D; ++x) part.acc[j * D + x] *= keep;
    }
    for (int64_t i = 0; i < nt; ++i) {
      const KV* v = vp + sl[t0 + i] * row;
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t g = 0; g < G; ++g)
          axpy(part.acc + (h * G + g) * D, scores[(h * G + g) * kBlock + i], v + h * D, D);
    }
  }
}

// 16 vectors to one: lane j of the result is the lane sum of v[j]. A tree of 15 two-vector
// shuffles and adds, where summing each vector on its own takes a shuffle tree per score.
inline Vec16 transpose_sum16(const Vec16* v) {
  Vec16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: halves of v[2i] summed, 8-15: of v[2i + 1]
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // four lanes for each of v[4i .. 4i + 3]
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // two lanes for each of v[8i .. 8i + 7]
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// Scores of NG query rows q[g] (stride D = DV * kLanes) against one KV head (offset hoff in a
// token's row) for the block's nt tokens, scaled, into scores[g * kBlock + i]; -inf past nt.
// The NG rows stay in registers; each token's K vectors are loaded once for all of them and
// each score is left as 16 partial lanes, summed 16 scores at a time by transpose_sum16.
// `ahead(i)` runs at token i (the caller's prefetches).
template <int64_t DV, int64_t NG, typename KV, typename Ahead>
__attribute__((optimize("fp-contract=fast"))) inline void score_heads(
    const float* q, const KV* kp, const int64_t* sl, int64_t nt, int64_t row, int64_t hoff,
    float scale, float* scores, const Ahead& ahead) {
  constexpr int64_t D = DV * kLanes;
  Vec16 qv[NG][DV];
  for (int64_t g = 0; g < NG; ++g)
    for (int64_t v = 0; v < DV; ++v) qv[g][v] = load16(q + g * D + v * kLanes);
  Vec16 lanes[NG][kBlock];
  for (int64_t i = 0; i < nt; ++i) {
    ahead(i);
    const KV* k = kp + sl[i] * row + hoff;
    Vec16 kv[DV];
    for (int64_t v = 0; v < DV; ++v) kv[v] = bf16::load16(k + v * kLanes);
    for (int64_t g = 0; g < NG; ++g) {
      Vec16 acc = qv[g][0] * kv[0];
      for (int64_t v = 1; v < DV; ++v) acc += qv[g][v] * kv[v];
      lanes[g][i] = acc;
    }
  }
  for (int64_t g = 0; g < NG; ++g) {
    for (int64_t i = nt; i < kBlock; ++i) lanes[g][i] = Vec16{};
    for (int64_t c = 0; c < kBlock; c += kLanes)
      store16(scores + g * kBlock + c, transpose_sum16(lanes[g] + c) * scale);
    for (int64_t i = nt; i < kBlock; ++i)
      scores[g * kBlock + i] = -std::numeric_limits<float>::infinity();
  }
}

// acc[g] = acc[g] * keep[g] + sum_i p[g * kBlock + i] * V[token i] for NG heads of one KV head,
// the NG x DV accumulators in registers for the whole block.
template <int64_t DV, int64_t NG, typename KV>
__attribute__((optimize("fp-contract=fast"))) inline void weigh_values(
    const KV* vp, const int64_t* sl, int64_t nt, int64_t row, int64_t hoff, const float* p,
    const float* keep, float* acc) {
  constexpr int64_t D = DV * kLanes;
  Vec16 a[NG][DV];
  for (int64_t g = 0; g < NG; ++g)
    for (int64_t v = 0; v < DV; ++v) a[g][v] = load16(acc + g * D + v * kLanes) * keep[g];
  for (int64_t i = 0; i < nt; ++i) {
    const KV* vr = vp + sl[i] * row + hoff;
    Vec16 vv[DV];
    for (int64_t v = 0; v < DV; ++v) vv[v] = bf16::load16(vr + v * kLanes);
    for (int64_t g = 0; g < NG; ++g) {
      const float w = p[g * kBlock + i];
      for (int64_t v = 0; v < DV; ++v) a[g][v] += vv[v] * w;
    }
  }
  for (int64_t g = 0; g < NG; ++g)
    for (int64_t v = 0; v < DV; ++v) store16(acc + g * D + v * kLanes, a[g][v]);
}

// f(std::integral_constant<int64_t, n>) for a run-time n in 1..4: the head count as a template
// argument, so a pass's rows and accumulators are fixed-size register arrays.
template <typename F>
inline void with_head_count(int64_t n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int64_t, 1>{}); break;
    case 2: f(std::integral_constant<int64_t, 2>{}); break;
    case 3: f(std::integral_constant<int64_t, 3>{}); break;
    default: f(std::integral_constant<int64_t, 4>{}); break;
  }
}

// attend_run for D = DV * kLanes (64 or 128): the same partial, computed a KV head at a time
// with the query rows and the weighted-V accumulators in registers (score_heads,
// weigh_values), kHeadsAtOnce query heads of a KV head at a time. While a block's first KV
// head is scored, its own rows kPrefetchAhead tokens ahead (first block) and the next block's
// rows (into L2) are prefetched; the other heads find the rows in cache.
template <int64_t DV, typename KV>
inline void attend_run_vec(const float* q, const KV* kp, const KV* vp, const int64_t* sl,
                           int64_t lo, int64_t hi, int64_t S, int64_t Hq, int64_t Hkv,
                           float scale, Partial part, std::vector<float>& scores) {
  constexpr int64_t D = DV * kLanes, kHeadsAtOnce = 16 / DV;
  const int64_t G = Hq / Hkv, row = Hkv * D;
  for (int64_t t = lo; t < hi; ++t)
    TORCH_CHECK(sl[t] >= 0 && sl[t] < S, "decode_attention: slot out of range");
  std::fill(part.m, part.m + Hq, -std::numeric_limits<float>::infinity());
  std::fill(part.l, part.l + Hq, 0.f);
  std::fill(part.acc, part.acc + Hq * D, 0.f);
  scores.resize(static_cast<size_t>(Hq * (kBlock + 1)));  // [Hq, kBlock], then keep [Hq]
  float* keep = scores.data() + Hq * kBlock;
  for (int64_t t = lo; t < std::min(hi, lo + kPrefetchAhead); ++t) {
    prefetch_row(kp + sl[t] * row, row);
    prefetch_row(vp + sl[t] * row, row);
  }
  auto no_prefetch = [](int64_t) {};
  for (int64_t t0 = lo; t0 < hi; t0 += kBlock) {
    const int64_t nt = std::min(kBlock, hi - t0);
    const int64_t next_end = std::min(hi, t0 + 2 * kBlock);
    auto prefetch = [&](int64_t i) {
      if (t0 == lo && i + kPrefetchAhead < nt) {
        prefetch_row(kp + sl[t0 + i + kPrefetchAhead] * row, row);
        prefetch_row(vp + sl[t0 + i + kPrefetchAhead] * row, row);
      }
      const int64_t t = t0 + kBlock + i;
      if (t < next_end)
        for (const KV* base : {kp, vp}) {
          const char* c = reinterpret_cast<const char*>(base + sl[t] * row);
          for (int64_t off = 0; off < row * static_cast<int64_t>(sizeof(KV)); off += 64)
            __builtin_prefetch(c + off, 0, 2);
        }
    };
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t g = 0; g < G; g += kHeadsAtOnce) {
        const int64_t j = h * G + g, n = std::min(kHeadsAtOnce, G - g);
        const float* qj = q + j * D;
        float* sj = scores.data() + j * kBlock;
        const int64_t* bs = sl + t0;
        with_head_count(n, [&](auto ng) {
          constexpr int64_t NG = decltype(ng)::value;
          if (j == 0)
            score_heads<DV, NG>(qj, kp, bs, nt, row, h * D, scale, sj, prefetch);
          else
            score_heads<DV, NG>(qj, kp, bs, nt, row, h * D, scale, sj, no_prefetch);
        });
      }
    for (int64_t j = 0; j < Hq; ++j)
      keep[j] = softmax_block(scores.data() + j * kBlock, part.m[j], part.l[j]);
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t g = 0; g < G; g += kHeadsAtOnce) {
        const int64_t j = h * G + g, n = std::min(kHeadsAtOnce, G - g);
        const float* pj = scores.data() + j * kBlock;
        float* aj = part.acc + j * D;
        const int64_t* bs = sl + t0;
        with_head_count(n, [&](auto ng) {
          weigh_values<DV, decltype(ng)::value, KV>(vp, bs, nt, row, h * D, pj, keep + j, aj);
        });
      }
  }
}

constexpr int64_t kSharedBlock = 64;     // keys per transposed tile (a multiple of kLanes)
constexpr int64_t kSharedChunk = 256;    // fewest shared keys worth a task of their own

// Groups of two or more consecutive requests sharing at least kMinShared leading slots. The
// shared length stops one short of the shortest request, so every request keeps a tail of its
// own (in decode, the new token's slot is never shared anyway).
inline std::vector<SharedGroup> shared_groups(const int64_t* slots, int64_t B, int64_t L,
                                              const int64_t* lens) {
  std::vector<SharedGroup> groups;
  int64_t b = 0;
  while (b < B) {
    SharedGroup g{b, 1, lens[b] - 1};
    while (b + g.count < B) {
      const int64_t* prev = slots + (b + g.count - 1) * L;
      const int64_t* next = slots + (b + g.count) * L;
      const int64_t limit = std::min(g.len, lens[b + g.count] - 1);
      int64_t n = 0;
      while (n < limit && prev[n] == next[n]) ++n;
      if (n < kMinShared) break;
      g.len = n;
      ++g.count;
    }
    if (g.count > 1) groups.push_back(g);
    b += g.count;
  }
  return groups;
}

// A query row's kSharedBlock scores s against one tile (nb valid keys): scaled, keys past nb
// set to -inf, the row's running max m and sum l updated, p = exp(s - m). Returns keep =
// exp(old m - new m), the factor the row's weighted V must be rescaled by.
inline float tile_softmax(Vec16* s, int64_t nb, float scale, float& m, float& l, float* p) {
  constexpr int64_t NV = kSharedBlock / kLanes;
  for (int64_t v = 0; v < NV; ++v) s[v] *= scale;
  if (nb < kSharedBlock)  // the chunk's last tile: keys past its end score -inf
    for (int64_t i = nb; i < kSharedBlock; ++i)
      s[i / kLanes][i % kLanes] = -std::numeric_limits<float>::infinity();
  Vec16 block_max = s[0];
  for (int64_t v = 1; v < NV; ++v) block_max = block_max > s[v] ? block_max : s[v];
  const float m_new = std::max(m, lane_max(block_max));
  const float keep = std::exp(m - m_new);  // exp(-inf) = 0 on the first block
  m = m_new;
  Vec16 sum = {};
  for (int64_t v = 0; v < NV; ++v) {
    const Vec16 e = exp_nonpositive(s[v] - m_new);
    store16(p + v * kLanes, e);
    sum += e;
  }
  l = l * keep + lane_sum(sum);
  return keep;
}

// One query row against one transposed tile (kt [D, NB], vt [NB, D], nb valid keys), any D:
// the online-softmax update of the row's running max m, sum l and weighted V acc [D]. (Head
// sizes 64 and 128 take shared_tile_rows instead.)
__attribute__((optimize("fp-contract=fast"))) inline void shared_tile_row(
    const float* qr, const float* kt, const float* vt, int64_t nb, int64_t D, float scale,
    float& m, float& l, float* acc) {
  constexpr int64_t NB = kSharedBlock, NV = NB / kLanes;
  Vec16 s[NV] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float qd = qr[d];
    for (int64_t v = 0; v < NV; ++v) s[v] += load16(kt + d * NB + v * kLanes) * qd;
  }
  float p[NB];
  const float keep = tile_softmax(s, nb, scale, m, l, p);
  if (keep != 1.f)
    for (int64_t d = 0; d < D; ++d) acc[d] *= keep;
  for (int64_t i = 0; i < nb; ++i) axpy(acc, p[i], vt + i * D, D);
}

// acc[r] += sum_{t < n} w[r][t] * vecs[t * stride : t * stride + NV * kLanes] for R rows: each
// step's NV vectors are loaded once for all R rows (the tile products of shared_tile_rows).
template <int64_t R, int64_t NV>
__attribute__((optimize("fp-contract=fast"))) inline void accumulate_rows(
    Vec16 (&acc)[R][NV], const float* vecs, int64_t stride, const float* const* w, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    Vec16 x[NV];
    for (int64_t v = 0; v < NV; ++v) x[v] = load16(vecs + t * stride + v * kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const float wt = w[r][t];
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += x[v] * wt;
    }
  }
}

// shared_tile_row for R query rows at once (D = DV * kLanes): each K vector of the tile and V
// row is loaded once for all R rows, whose scores and weighted-V accumulators (R x 4 and
// R x DV vectors) stay in registers. qr[r], m[r], l[r], acc[r] are row r's query, running
// max, sum and weighted V.
template <int64_t DV, int64_t R>
__attribute__((optimize("fp-contract=fast"))) inline void shared_tile_rows(
    const float* const* qr, const float* kt, const float* vt, int64_t nb, float scale,
    float* const* m, float* const* l, float* const* acc) {
  constexpr int64_t NB = kSharedBlock, NV = NB / kLanes, D = DV * kLanes;
  Vec16 s[R][NV] = {};
  accumulate_rows<R, NV>(s, kt, NB, qr, D);  // s[r] = q_r . K^T, 64 keys
  float p[R][NB];
  float keep[R];
  const float* pr[R];
  for (int64_t r = 0; r < R; ++r) {
    keep[r] = tile_softmax(s[r], nb, scale, *m[r], *l[r], p[r]);
    pr[r] = p[r];
  }
  Vec16 a[R][DV];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < DV; ++v) a[r][v] = load16(acc[r] + v * kLanes) * keep[r];
  accumulate_rows<R, DV>(a, vt, D, pr, nb);  // a[r] += p_r . V
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < DV; ++v) store16(acc[r] + v * kLanes, a[r][v]);
}

// Keys [lo, hi) of one group's shared slots `sl`, KV head h, for every query row of the group:
// row r is request first + r / G's head h * G + r % G. Writes those rows' running max, sum and
// weighted V into parts[b] (one Partial per request, this chunk's).
// (scores and V updates as fused multiply-adds even in a -ffp-contract=off build: they are
// summed in another order than the per-request path's anyway)
template <int64_t DV, typename KV>
__attribute__((optimize("fp-contract=fast"))) inline void attend_shared(const float* q, const KV* kp, const KV* vp, const int64_t* sl,
                          int64_t lo, int64_t hi, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t h, float scale, const SharedGroup& g,
                          const std::vector<Partial>& parts) {
  constexpr int64_t NB = kSharedBlock;
  const int64_t G = Hq / Hkv, row = Hkv * D;
  std::vector<float> kt(static_cast<size_t>(D * NB)), vt(static_cast<size_t>(NB * D));
  for (int64_t b = 0; b < g.count; ++b)
    for (int64_t x = 0; x < G; ++x) {
      const int64_t j = h * G + x;
      parts[b].m[j] = -std::numeric_limits<float>::infinity();
      parts[b].l[j] = 0.f;
      std::fill(parts[b].acc + j * D, parts[b].acc + (j + 1) * D, 0.f);
    }
  for (int64_t k0 = lo; k0 < hi; k0 += NB) {
    const int64_t nb = std::min(NB, hi - k0);
    // the tile: kt[d][i] = K[slot i][h][d], vt[i][d] = V[slot i][h][d]; missing keys are 0
    for (int64_t i = 0; i < NB; ++i) {
      if (i < nb) {
        TORCH_CHECK(sl[k0 + i] >= 0 && sl[k0 + i] < S, "decode_attention: slot out of range");
        const KV* k = kp + sl[k0 + i] * row + h * D;
        const KV* v = vp + sl[k0 + i] * row + h * D;
        for (int64_t d = 0; d < D; ++d) kt[d * NB + i] = bf16::widen(k[d]);
        for (int64_t d = 0; d < D; ++d) vt[i * D + d] = bf16::widen(v[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) kt[d * NB + i] = 0.f;
      }
    }
    const int64_t rows = g.count * G;
    if constexpr (DV > 0) {  // kRows query rows at a time, then one at a time
      constexpr int64_t kRows = 16 / DV;
      auto pass = [&](int64_t r0, auto n) {  // rows r0 .. r0 + n - 1
        constexpr int64_t N = decltype(n)::value;
        const float* qr[N];
        float *m[N], *l[N], *acc[N];
        for (int64_t x = 0; x < N; ++x) {
          const int64_t b = (r0 + x) / G, j = h * G + (r0 + x) % G;
          qr[x] = q + ((g.first + b) * Hq + j) * D;
          m[x] = parts[b].m + j;
          l[x] = parts[b].l + j;
          acc[x] = parts[b].acc + j * D;
        }
        shared_tile_rows<DV, N>(qr, kt.data(), vt.data(), nb, scale, m, l, acc);
      };
      int64_t r0 = 0;
      for (; r0 + kRows <= rows; r0 += kRows) pass(r0, std::integral_constant<int64_t, kRows>{});
      for (; r0 < rows; ++r0) pass(r0, std::integral_constant<int64_t, 1>{});
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = r / G, j = h * G + r % G;
        shared_tile_row(q + ((g.first + b) * Hq + j) * D, kt.data(), vt.data(), nb, D, scale,
                        parts[b].m[j], parts[b].l[j], parts[b].acc + j * D);
      }
    }
  }
}

}  // namespace decode_attention_detail

namespace decode_attention {

std::vector<SharedGroup> shared_groups(torch::Tensor slots, torch::Tensor seq_lens) {
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64,
              "decode_attention: slots and seq_lens must be int64");
  TORCH_CHECK(slots.dim() == 2 && seq_lens.numel() == slots.size(0),
              "decode_attention: slots [B, L] and seq_lens [B]");
  slots = slots.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t B = slots.size(0), L = slots.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= L, "decode_attention: bad seq_len ", lens[b]);
  return decode_attention_detail::shared_groups(slots.data_ptr<int64_t>(), B, L, lens);
}

torch::Tensor attend(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf,
                     torch::Tensor slots, torch::Tensor seq_lens, double scale,
                     const std::vector<SharedGroup>* groups_in) {
  namespace dd = decode_attention_detail;
  const bool half = k_buf.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 &&
                  (half || k_buf.scalar_type() == torch::kFloat32) &&
                  v_buf.scalar_type() == k_buf.scalar_type(),
              "decode_attention: q must be float32 and K/V both float32 or both bfloat16");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64,
              "decode_attention: slots and seq_lens must be int64");
  q = q.contiguous();
  slots = slots.contiguous();
  seq_lens = seq_lens.contiguous();
  TORCH_CHECK(k_buf.is_contiguous() && v_buf.is_contiguous(), "KV buffers must be contiguous");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t S = k_buf.size(0), Hkv = k_buf.size(1);
  TORCH_CHECK(k_buf.size(2) == D && Hq % Hkv == 0, "decode_attention: shape mismatch");
  const int64_t L = slots.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= L, "decode_attention: bad seq_len ", lens[b]);

  // Shared prefixes first: each group's common slots are cut into chunks, one task per chunk
  // and KV head; each request's remaining tokens (its tail) are split into runs as before.
  const std::vector<dd::SharedGroup> groups =
      groups_in != nullptr ? *groups_in : shared_groups(slots, seq_lens);
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> shared_len(B, 0), shared_chunks(B, 0);
  int64_t shared_tasks = 0;
  std::vector<int64_t> group_chunks(groups.size());
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const dd::SharedGroup& g = groups[gi];
    const int64_t want = (4 * threads + groups.size() * Hkv - 1) / (groups.size() * Hkv);
    group_chunks[gi] = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, g.len / dd::kSharedChunk));
    shared_tasks += group_chunks[gi] * Hkv;
    for (int64_t b = g.first; b < g.first + g.count; ++b) {
      shared_len[b] = g.len;
      shared_chunks[b] = group_chunks[gi];
    }
  }

  // Split the tails into runs so that every thread has a few tasks (fewer, longer runs when
  // there are many requests: each run's partial costs a merge).
  const int64_t wanted_tasks = 4 * threads;
  const int64_t max_runs = std::max<int64_t>(1, (wanted_tasks + B - 1) / B);
  // partials of request b: first_part[b] .. first_part[b + 1], its shared chunks first
  std::vector<int64_t> first_task(B + 1, 0), first_part(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t tail = lens[b] - shared_len[b];
    const int64_t runs = std::clamp<int64_t>(tail / dd::kMinChunk, 1, max_runs);
    first_task[b + 1] = first_task[b] + runs;
    first_part[b + 1] = first_part[b] + shared_chunks[b] + runs;
  }
  const int64_t tasks = first_task[B];
  std::vector<int64_t> task_request(tasks);
  for (int64_t b = 0; b < B; ++b)
    std::fill(task_request.begin() + first_task[b], task_request.begin() + first_task[b + 1], b);

  const int64_t per_task = Hq * (D + 2);  // m, l, acc
  std::vector<float> partials(static_cast<size_t>(first_part[B] * per_task));
  const float* qp = q.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  auto partial = [&](int64_t part) {
    float* base = partials.data() + part * per_task;
    return dd::Partial{base, base + Hq, base + 2 * Hq};
  };

  // one list of work: shared (group, head, chunk) tasks, then tail runs
  std::vector<std::array<int64_t, 3>> shared_work;  // group, head, chunk
  shared_work.reserve(shared_tasks);
  for (size_t gi = 0; gi < groups.size(); ++gi)
    for (int64_t c = 0; c < group_chunks[gi]; ++c)
      for (int64_t h = 0; h < Hkv; ++h) shared_work.push_back({static_cast<int64_t>(gi), h, c});

  // Tasks differ in size (a shared chunk serves a whole group): each thread takes the next
  // one as it finishes, rather than a fixed half of the list.
  const int64_t all_tasks = shared_tasks + tasks;
  std::atomic<int64_t> next_task{0};
  // kp, vp: the pool as float32 or as bfloat16's 16 bits (each kernel widens what it loads)
  auto run_tasks = [&](auto kp, auto vp) {
  at::parallel_for(0, std::min(threads, all_tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> scores;
    std::vector<dd::Partial> parts;
    for (int64_t task = next_task++; task < all_tasks; task = next_task++) {
      if (task < shared_tasks) {
        const auto [gi, h, c] = shared_work[task];
        const dd::SharedGroup& g = groups[gi];
        const int64_t chunks = group_chunks[gi];
        parts.clear();
        for (int64_t b = g.first; b < g.first + g.count; ++b) parts.push_back(partial(first_part[b] + c));
        const int64_t lo = g.len * c / chunks, hi = g.len * (c + 1) / chunks;
        if (D == 64)
          dd::attend_shared<4>(qp, kp, vp, sp + g.first * L, lo, hi, S, Hq, Hkv, D, h, fscale, g, parts);
        else if (D == 128)
          dd::attend_shared<8>(qp, kp, vp, sp + g.first * L, lo, hi, S, Hq, Hkv, D, h, fscale, g, parts);
        else
          dd::attend_shared<0>(qp, kp, vp, sp + g.first * L, lo, hi, S, Hq, Hkv, D, h, fscale, g, parts);
        continue;
      }
      const int64_t t = task - shared_tasks;
      const int64_t b = task_request[t], run = t - first_task[b];
      const int64_t runs = first_task[b + 1] - first_task[b];
      const int64_t lo0 = shared_len[b], n = lens[b] - lo0;
      const int64_t lo = lo0 + n * run / runs, hi = lo0 + n * (run + 1) / runs;
      const dd::Partial part = partial(first_part[b] + shared_chunks[b] + run);
      if (D == 64)
        dd::attend_run_vec<4>(qp + b * Hq * D, kp, vp, sp + b * L, lo, hi, S, Hq, Hkv, fscale,
                              part, scores);
      else if (D == 128)
        dd::attend_run_vec<8>(qp + b * Hq * D, kp, vp, sp + b * L, lo, hi, S, Hq, Hkv, fscale,
                              part, scores);
      else
        dd::attend_run(qp + b * Hq * D, kp, vp, sp + b * L, lo, hi, S, Hq, Hkv, D, fscale, part,
                       scores);
    }
  });
  };
  if (half)
    run_tasks(reinterpret_cast<const uint16_t*>(k_buf.data_ptr<at::BFloat16>()),
              reinterpret_cast<const uint16_t*>(v_buf.data_ptr<at::BFloat16>()));
  else
    run_tasks(k_buf.data_ptr<float>(), v_buf.data_ptr<float>());

  // out[b, j] = sum_r exp(m_r - M) acc_r / sum_r exp(m_r - M) l_r, M the runs' max
  auto out = torch::empty_like(q);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / Hq, j = bj % Hq;
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t r = first_part[b]; r < first_part[b + 1]; ++r) M = std::max(M, partial(r).m[j]);
      float* o = op + bj * D;
      std::fill(o, o + D, 0.f);
      float denom = 0.f;
      for (int64_t r = first_part[b]; r < first_part[b + 1]; ++r) {
        const dd::Partial p = partial(r);
        const float w = std::exp(p.m[j] - M);
        denom += w * p.l[j];
        dd::axpy(o, w, p.acc + j * D, D);
      }
      const float inv = 1.f / denom;
      for (int64_t x = 0; x < D; ++x) o[x] *= inv;
    }
  });
  return out;
}

}  // namespace decode_attention
