#pragma once
// Decode attention over the paged KV pool, reading each request's K/V rows in place.
//
// out[b, j] = softmax(q[b, j] . K[slots[b, :n_b], j / G]^T * scale) @ V[slots[b, :n_b], j / G]
// with G = Hq / Hkv query heads per KV head (GQA, as transformers' repeat_kv pairs them).
//
// The torch path it replaces gathers every request's K and V into padded [B, L, Hkv, D] copies
// and multiplies those: at long contexts (a 1,000-token shared prefix at batch 32) that moves
// ~50 MB per layer through memory several times. Here each (request, KV head) task reads its K
// rows once (scores for its G query heads together) and its V rows once; the scores of one task
// (n_b x G floats) stay in cache. Tasks are split across threads with at::parallel_for (torch's
// pool, sized by torch.set_num_threads). Float32 only; the caller falls back to torch otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float* y, float a, const float* x, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

}  // namespace

// q [B, Hq, D], k_buf/v_buf [S, Hkv, D] (float32, contiguous), slots [B, L] int64 (row b's
// first seq_lens[b] entries are its KV slots), seq_lens [B] int64 (each >= 1).
inline torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf,
                               torch::Tensor slots, torch::Tensor seq_lens, double scale) {
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
  const int64_t G = Hq / Hkv, L = slots.size(1);
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= L, "decode_attention: bad seq_len ", lens[b]);

  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_buf.data_ptr<float>();
  const float* vp = v_buf.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = Hkv * D;  // floats between consecutive slots

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv, n = lens[b];
      const float* qh = qp + (b * Hq + h * G) * D;  // its G query heads, contiguous
      const int64_t* sl = sp + b * L;
      scores.resize(static_cast<size_t>(n * G));
      std::vector<float> mx(G, -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < n; ++t) {
        const int64_t s = sl[t];
        TORCH_CHECK(s >= 0 && s < S, "decode_attention: slot out of range");
        const float* k = kp + s * row + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const float x = dot(qh + g * D, k, D) * fscale;
          scores[t * G + g] = x;
          mx[g] = std::max(mx[g], x);
        }
      }
      std::vector<float> sum(G, 0.f);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const float e = std::exp(scores[t * G + g] - mx[g]);
          scores[t * G + g] = e;
          sum[g] += e;
        }
      float* oh = op + (b * Hq + h * G) * D;
      for (int64_t t = 0; t < n; ++t) {
        const float* v = vp + sl[t] * row + h * D;
        for (int64_t g = 0; g < G; ++g) axpy(oh + g * D, scores[t * G + g], v, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / sum[g];
#pragma omp simd
        for (int64_t i = 0; i < D; ++i) oh[g * D + i] *= inv;
      }
    }
  });
  return out;
}
