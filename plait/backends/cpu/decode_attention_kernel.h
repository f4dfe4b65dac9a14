#pragma once
// Decode attention over the paged KV pool, reading each request's K/V rows in place.
//
// out[b, j] = softmax(q[b, j] . K[slots[b, :n_b], j / G]^T * scale) @ V[slots[b, :n_b], j / G]
// with G = Hq / Hkv query heads per KV head (GQA, as transformers' repeat_kv pairs them).
//
// Why it is shaped this way (measured on SmolLM2-135M's 9 x 64 heads, 2 cores):
// - A task is one request's run of consecutive tokens, all heads together, so each token's K
//   and V rows ([Hkv, D], contiguous in the pool) are read whole, once, and the rows of the
//   next tokens are prefetched: slots are indirect, so the hardware prefetcher cannot follow.
// - A request's tokens are split over several tasks when there are fewer requests than threads
//   want work (batch 1 has one request and three KV heads for two threads), each task keeping
//   a running max, sum and weighted V (the online softmax of flash-decoding); a merge step
//   combines them. Blocks of kBlock tokens keep their scores in cache between the two passes.
// - Dot products and V updates run on 16-float vectors (GCC vector extensions: zmm, ymm pairs
//   or SSE quads, as the build's flags allow), reduced to a score with a shuffle tree. The
//   first version, with `omp simd` loops, summed each score's 16 lanes one by one and ran at
//   ~5 GB/s of KV; the pool's bandwidth is ~25 GB/s.
// Float32 only; the caller falls back to torch otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace decode_attention_detail {

typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 32;       // tokens whose scores are computed before their V pass
                                     // (a multiple of kLanes)
constexpr int64_t kMinChunk = 32;    // fewest tokens worth a task of their own
constexpr int64_t kPrefetchAhead = 4;  // tokens ahead whose K/V rows are prefetched

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

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

// exp(x) for x <= 0 (scores minus their running max), to ~1 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, 2^n put into the exponent bits; below
// -87 (or -inf, a padding score) the result is 0. Sixteen at a time: one scalar std::exp per
// score cost as much as reading the score's K and V rows.
inline Vec16 exp_nonpositive(Vec16 x) {
  typedef int32_t VecI16 __attribute__((vector_size(64)));
  const VecI16 underflow = x < -87.f;
  x = x < -87.f ? -87.f : x;
  const Vec16 shifter = Vec16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 n = (x * 1.44269504088896341f + shifter) - shifter;
  const Vec16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec16 p = Vec16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec16 e = p * r * r + r + 1.f;
  const VecI16 bits = (__builtin_convertvector(n, VecI16) + 127) << 23;
  Vec16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const Vec16 y = e * two_n;
  VecI16 ybits;
  std::memcpy(&ybits, &y, sizeof(ybits));
  ybits &= ~underflow;
  Vec16 out;
  std::memcpy(&out, &ybits, sizeof(out));
  return out;
}

inline float dot(const float* a, const float* b, int64_t d) {
  Vec16 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) acc += load16(a + i) * load16(b + i);
  float s = lane_sum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// y[0:d] += a * x
inline void axpy(float* y, float a, const float* x, int64_t d) {
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) store16(y + i, load16(y + i) + load16(x + i) * a);
  for (; i < d; ++i) y[i] += x[i] * a;
}

inline void prefetch_row(const float* p, int64_t floats) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < floats * 4; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// One task's result for its Hq heads: the running max and sum of exp(score - max), and
// acc = sum of exp(score - max) * v over its tokens.
struct Partial {
  float* m;    // [Hq]
  float* l;    // [Hq]
  float* acc;  // [Hq, D]
};

// Tokens [lo, hi) of one request into `part`.
inline void attend_run(const float* q, const float* kp, const float* vp, const int64_t* sl,
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
      const float* k = kp + sl[t] * row;
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t g = 0; g < G; ++g)
          scores[(h * G + g) * kBlock + i] = dot(q + (h * G + g) * D, k + h * D, D) * scale;
    }
    // per head: the new running max, the old sums rescaled to it, the block's exps added
    // (padding scores are -inf: their exps are 0)
    for (int64_t j = 0; j < Hq; ++j) {
      float* s = scores.data() + j * kBlock;
      Vec16 block_max = load16(s);
      for (int64_t i = kLanes; i < kBlock; i += kLanes) {
        const Vec16 x = load16(s + i);
        block_max = block_max > x ? block_max : x;
      }
      const float m = std::max(part.m[j], lane_max(block_max));
      const float keep = std::exp(part.m[j] - m);  // exp(-inf) = 0 on the first block
      part.m[j] = m;
      if (keep != 1.f)
        for (int64_t x = 0; x < D; ++x) part.acc[j * D + x] *= keep;
      Vec16 sum = {};
      for (int64_t i = 0; i < kBlock; i += kLanes) {
        const Vec16 e = exp_nonpositive(load16(s + i) - m);
        store16(s + i, e);
        sum += e;
      }
      part.l[j] = part.l[j] * keep + lane_sum(sum);
    }
    for (int64_t i = 0; i < nt; ++i) {
      const float* v = vp + sl[t0 + i] * row;
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t g = 0; g < G; ++g)
          axpy(part.acc + (h * G + g) * D, scores[(h * G + g) * kBlock + i], v + h * D, D);
    }
  }
}

}  // namespace decode_attention_detail

// q [B, Hq, D], k_buf/v_buf [S, Hkv, D] (float32, contiguous), slots [B, L] int64 (row b's
// first seq_lens[b] entries are its KV slots), seq_lens [B] int64 (each >= 1).
inline torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf,
                                      torch::Tensor slots, torch::Tensor seq_lens, double scale) {
  namespace dd = decode_attention_detail;
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_buf.scalar_type() == torch::kFloat32 &&
                  v_buf.scalar_type() == torch::kFloat32,
              "decode_attention: float32 only");
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

  // Split requests into runs so that every thread has a few tasks (fewer, longer runs when
  // there are many requests: each run's partial costs a merge).
  const int64_t wanted_tasks = 4 * at::get_num_threads();
  const int64_t max_runs = std::max<int64_t>(1, (wanted_tasks + B - 1) / B);
  std::vector<int64_t> first_task(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t runs = std::clamp<int64_t>(lens[b] / dd::kMinChunk, 1, max_runs);
    first_task[b + 1] = first_task[b] + runs;
  }
  const int64_t tasks = first_task[B];
  std::vector<int64_t> task_request(tasks);
  for (int64_t b = 0; b < B; ++b)
    std::fill(task_request.begin() + first_task[b], task_request.begin() + first_task[b + 1], b);

  const int64_t per_task = Hq * (D + 2);  // m, l, acc
  std::vector<float> partials(static_cast<size_t>(tasks * per_task));
  const float* qp = q.data_ptr<float>();
  const float* kp = k_buf.data_ptr<float>();
  const float* vp = v_buf.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
  auto partial = [&](int64_t task) {
    float* base = partials.data() + task * per_task;
    return dd::Partial{base, base + Hq, base + 2 * Hq};
  };

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task_request[task], run = task - first_task[b];
      const int64_t runs = first_task[b + 1] - first_task[b], n = lens[b];
      const int64_t lo = n * run / runs, hi = n * (run + 1) / runs;
      dd::attend_run(qp + b * Hq * D, kp, vp, sp + b * L, lo, hi, S, Hq, Hkv, D, fscale,
                     partial(task), scores);
    }
  });

  // out[b, j] = sum_r exp(m_r - M) acc_r / sum_r exp(m_r - M) l_r, M the runs' max
  auto out = torch::empty_like(q);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bj = begin; bj < end; ++bj) {
      const int64_t b = bj / Hq, j = bj % Hq;
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t r = first_task[b]; r < first_task[b + 1]; ++r) M = std::max(M, partial(r).m[j]);
      float* o = op + bj * D;
      std::fill(o, o + D, 0.f);
      float denom = 0.f;
      for (int64_t r = first_task[b]; r < first_task[b + 1]; ++r) {
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
