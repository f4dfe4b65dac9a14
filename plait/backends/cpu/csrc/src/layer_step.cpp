// One step of a Llama-family model (Llama, SmolLM2, Mistral, Qwen2) in C++: every layer, the
// final norm and the LM head in a single call from Python, for a decode batch or a prefill.
//
// Why: at batch 1 the eager torch step of SmolLM2-135M runs ~40 tensor ops per layer, each a
// Python call and a dispatch of a few microseconds, plus nn.Module overhead; with GGUF weights
// and the VNNI kernel the matrix products are a small part of the step (docs/cpu-backend.md
// has the profile). Here the glue between the
// products (RMSNorm, RoPE, the KV write, SiLU * up, the residual adds) is a plain loop over
// the rows, and the products call the same kernels the eager path calls:
//   - quantized weights: qmatmul::qmatmul / qmatmul_q8;
//   - panel-packed float32 weights: panel_gemm::linear_with_form (the float32 panels, or the
//     weight's lossless 4-bit or 16-bit form where it has one);
//   - oneDNN-packed float32 weights: qmatmul::onednn_linear (mkldnn::_linear_pointwise);
//   - plain float32 weights: at::linear.
// A decode batch's attention is decode_attention::attend over the paged pool.
//
// The arithmetic follows plait/models/llama.py op for op (fp32 RMSNorm as weight * (x * r),
// RoPE as x * cos + rotate_half(x) * sin, silu(g) * u), so results differ from the eager step
// only by float rounding (sum order in the norm, exp's last bits), as the paged attention
// kernel already does. The module is built with -ffp-contract=off
// (plait/backends/cpu/cpp_build.py): a fused multiply-add would round RoPE and the norm
// differently from torch's separate multiply and add.
//
// Holds: float32 activations and float32 (or lossless 16-bit, panel_gemm's encode_bf16)
// weights; float32 or bfloat16 KV (a bf16 pool, --dtype bfloat16: the new K/V rows are rounded
// to bf16 as they are written, as the eager step's store into the pool rounds them; attention
// widens them back); one new token per row; tensor parallelism 1.
// plait/backends/cpu/native_step.py builds a DecodeModel only for models that meet this.
#include "plait_cpu/layer_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "plait_cpu/bf16.h"
#include "plait_cpu/decode_attention.h"
#include "plait_cpu/lora_delta.h"
#include "plait_cpu/panel_gemm.h"
#include "plait_cpu/qmatmul.h"
#include "plait_cpu/simd.h"

namespace layer_step {

namespace {

// The MLP goes this many rows at a time (DecodeModel::layers).
constexpr int64_t kMlpRows = 1024;

// weight * (x * rsqrt(mean(x^2) + eps)) per row, as plait.models.llama.RMSNorm in float32
// (the sum of squares is taken in double: the exact value, rounded once).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, float eps) {
  const int64_t B = x.size(0), H = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // rows in parallel only when there are many (a prefill): each row's arithmetic is the same
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(H, 1)),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = xp + b * H;
      double acc = 0.0;
      for (int64_t i = 0; i < H; ++i) acc += static_cast<double>(row[i] * row[i]);
      const float mean = static_cast<float>(acc) / static_cast<float>(H);
      const float r = 1.f / std::sqrt(mean + eps);
      float* dst = op + b * H;
      for (int64_t i = 0; i < H; ++i) dst[i] = wp[i] * (row[i] * r);
    }
  });
  return out;
}

// x * cos + rotate_half(x) * sin over `heads` heads of D at x, in place.
void rotate(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  float tmp[1024];
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < half; ++i) tmp[i] = v[i] * cos[i] + (-v[i + half]) * sin[i];
    for (int64_t i = half; i < D; ++i) tmp[i] = v[i] * cos[i] + v[i - half] * sin[i];
    std::memcpy(v, tmp, D * sizeof(float));
  }
}

// silu(gate) * up for qkv-style fused rows [B, 2I] -> [B, I], 16 at a time (a scalar expf per
// element is a visible part of a step). silu(g) = g / (1 + e^-g) is computed
// as g / (1 + e) for g >= 0 and as g e / (1 + e) for g < 0, with e = exp(-|g|) <= 1: the same
// value, and the vector exp (simd.h's, ~1 ulp) never overflows.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  const int64_t B = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({B, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / I), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* g = gp + b * 2 * I;
      const float* u = g + I;
      float* dst = op + b * I;
      int64_t i = 0;
      for (; i + simd::kLanes <= I; i += simd::kLanes) {
        const simd::Vec16 gv = simd::load16(g + i);
        const simd::Vec16 e = simd::exp_nonpositive(gv < 0.f ? gv : -gv);
        const simd::Vec16 num = gv < 0.f ? gv * e : gv;
        simd::store16(dst + i, num / (1.f + e) * simd::load16(u + i));
      }
      for (; i < I; ++i) dst[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// A token's new K and V rows (kv floats each, at k and k + kv) into the pools at element
// `offset`: copied to a float32 pool, rounded to a bfloat16 one (`half`).
void store_kv(void* kb, void* vb, bool half, int64_t offset, const float* k, int64_t kv) {
  if (!half) {
    std::memcpy(static_cast<float*>(kb) + offset, k, kv * sizeof(float));
    std::memcpy(static_cast<float*>(vb) + offset, k + kv, kv * sizeof(float));
    return;
  }
  uint16_t* kh = static_cast<uint16_t*>(kb) + offset;
  uint16_t* vh = static_cast<uint16_t*>(vb) + offset;
  for (int64_t i = 0; i < kv; ++i) kh[i] = bf16::round(k[i]);
  for (int64_t i = 0; i < kv; ++i) vh[i] = bf16::round(k[kv + i]);
}

}  // namespace

Linear Linear::dense(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
              "dense weight must be float32 [N, K]");
  Linear l;
  l.weight = weight.contiguous();
  l.bias = bias;
  return l;
}

Linear Linear::packed(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  Linear l;
  l.kind = kPacked;
  l.weight = weight;
  l.bias = bias;
  return l;
}

Linear Linear::panel(torch::Tensor weight, int64_t out_features,
                     c10::optional<torch::Tensor> bias, std::vector<torch::Tensor> compact) {
  // a weight with the 16-bit form may have dropped its panels: linear_with_form reads
  // only the form then
  TORCH_CHECK((compact.size() == 1 && weight.numel() == 0) ||
                  (weight.dim() == 3 && weight.size(2) == panel_gemm::kCols &&
                   weight.scalar_type() == torch::kFloat32 && weight.is_contiguous()),
              "panel weight must come from panel_gemm.pack (or be empty beside a 16-bit "
              "form)");
  Linear l;
  l.kind = kPanel;
  l.weight = weight;
  l.out_features = out_features;
  l.bias = bias;
  l.compact = std::move(compact);
  return l;
}

Linear Linear::quantized(torch::Tensor qs, torch::Tensor scales,
                         c10::optional<torch::Tensor> mins, int64_t bits, int64_t group,
                         bool int8_activations, c10::optional<torch::Tensor> bias) {
#ifndef PLAIT_VNNI
  TORCH_CHECK(!int8_activations, "int8 activations need the avx512vnni build");
#endif
  Linear l;
  l.kind = kQuantized;
  l.qs = qs;
  l.scales = scales;
  l.mins = mins;
  l.bits = bits;
  l.group = group;
  l.int8_activations = int8_activations;
  l.bias = bias;
  return l;
}

torch::Tensor Linear::operator()(const torch::Tensor& x) const {
  switch (kind) {
    case kDense:
      return at::linear(x, weight, bias);
    case kPacked:
      return qmatmul::onednn_linear(x, weight, bias);
    case kPanel:
      return panel_gemm::linear_with_form(x, weight, compact, out_features, bias);
    case kQuantized: {
#ifdef PLAIT_VNNI
      torch::Tensor y = int8_activations ? qmatmul::qmatmul_q8(x, qs, scales, mins, bits, group)
                                         : qmatmul::qmatmul(x, qs, scales, mins, bits, group);
#else
      torch::Tensor y = qmatmul::qmatmul(x, qs, scales, mins, bits, group);
#endif
      if (bias.has_value() && bias->defined()) y.add_(*bias);
      return y;
    }
  }
  TORCH_CHECK(false, "unknown Linear kind");
}

DecodeModel::DecodeModel(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         double eps, double scale, torch::Tensor cos, torch::Tensor sin,
                         torch::Tensor final_norm, Linear lm_head)
    : hq_(num_heads), hkv_(num_kv_heads), d_(head_dim), eps_(static_cast<float>(eps)),
      scale_(scale), cos_(cos.contiguous()), sin_(sin.contiguous()),
      final_norm_(final_norm.contiguous()), lm_head_(std::move(lm_head)) {
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 1024, "head_dim must be even and <= 1024");
  TORCH_CHECK(cos_.dim() == 2 && cos_.size(1) == head_dim && sin_.sizes() == cos_.sizes() &&
                  cos_.scalar_type() == torch::kFloat32,
              "cos/sin must be float32 [max_positions, head_dim]");
}

void DecodeModel::add_layer(torch::Tensor input_norm, Linear qkv, Linear o,
                            torch::Tensor post_norm, Linear gate_up, Linear down,
                            torch::Tensor k_buffer, torch::Tensor v_buffer) {
  const auto kv_type = k_buffer.scalar_type();
  TORCH_CHECK(k_buffer.is_contiguous() && v_buffer.is_contiguous() &&
                  (kv_type == torch::kFloat32 || kv_type == torch::kBFloat16) &&
                  v_buffer.scalar_type() == kv_type && k_buffer.size(1) == hkv_ &&
                  k_buffer.size(2) == d_ && v_buffer.sizes() == k_buffer.sizes(),
              "KV buffers must be contiguous float32 or bfloat16 [S, Hkv, D]");
  TORCH_CHECK(layers_.empty() || layers_[0].k_buffer.scalar_type() == kv_type,
              "every layer's KV buffers must have one dtype");
  layers_.push_back(Layer{input_norm.contiguous(), post_norm.contiguous(), std::move(qkv),
                          std::move(o), std::move(gate_up), std::move(down), k_buffer,
                          v_buffer});
}

void DecodeModel::set_layer_lora(int64_t layer, int64_t target, torch::Tensor a,
                                 torch::Tensor bt) {
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()),
              "set_layer_lora: no layer ", layer);
  TORCH_CHECK(target >= kLoraQkv && target <= kLoraDown, "set_layer_lora: unknown target ",
              target);
  TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && a.is_contiguous() && bt.is_contiguous() &&
                  a.scalar_type() == torch::kFloat32 && bt.scalar_type() == torch::kFloat32,
              "LoRA buffers must be contiguous float32 [slots, K, in] and [slots, K, out]");
  layers_[layer].lora[target] = LoraWeights{a, bt};
}

void DecodeModel::set_lora(torch::Tensor row_slots, torch::Tensor scaling) {
  TORCH_CHECK(row_slots.scalar_type() == torch::kInt64 && row_slots.dim() == 1,
              "row_slots must be int64 [rows]");
  TORCH_CHECK(scaling.scalar_type() == torch::kFloat32 && scaling.dim() == 1,
              "scaling must be float32 [slots]");
  lora_rows_ = row_slots.contiguous();
  lora_scaling_ = scaling.contiguous();
}

void DecodeModel::clear_lora() {
  lora_rows_ = torch::Tensor();
  lora_scaling_ = torch::Tensor();
}

torch::Tensor DecodeModel::with_lora(const Layer& layer, LoraTarget target,
                                     const torch::Tensor& x, torch::Tensor y, int64_t r0) const {
  const LoraWeights& w = layer.lora[target];
  if (!lora_rows_.defined() || !w.a.defined()) return y;
  TORCH_CHECK(r0 + y.size(0) <= lora_rows_.numel(), "set_lora's rows do not cover the step");
  y = y.contiguous();
  lora_delta::add(x.contiguous(), y, w.a, w.bt, lora_rows_.narrow(0, r0, y.size(0)),
                  lora_scaling_);
  return y;
}

torch::Tensor DecodeModel::forward(torch::Tensor x, torch::Tensor positions,
                                   torch::Tensor out_loc, torch::Tensor slots,
                                   torch::Tensor seq_lens) {
  return lm_head_(hidden(x, positions, out_loc, slots, seq_lens));
}

torch::Tensor DecodeModel::hidden(torch::Tensor x, torch::Tensor positions,
                                  torch::Tensor out_loc, torch::Tensor slots,
                                  torch::Tensor seq_lens) {
  // the batch's shared prefixes are the same in every layer: formed once
  const auto groups = decode_attention::shared_groups(slots, seq_lens);
  x = layers(step_input(x, positions, out_loc), [&](const torch::Tensor& q, size_t i) {
    return decode_attention::attend(q, layers_[i].k_buffer, layers_[i].v_buffer, slots,
                                    seq_lens, scale_, &groups);
  });
  return rms_norm(x, final_norm_, eps_);
}

torch::Tensor DecodeModel::extend(torch::Tensor x, torch::Tensor positions,
                                  torch::Tensor out_loc, torch::Tensor logits_rows,
                                  py::function attend) {
  x = layers(step_input(x, positions, out_loc), [&](const torch::Tensor& q, size_t i) {
    torch::Tensor attn = attend(q, static_cast<int64_t>(i)).cast<torch::Tensor>();
    TORCH_CHECK(attn.sizes() == q.sizes() && attn.scalar_type() == torch::kFloat32,
                "attend must return float32 [T, Hq, D]");
    return attn;
  });
  return lm_head_(rms_norm(x.index_select(0, logits_rows), final_norm_, eps_));
}

// A step's rows checked (dtypes, one position and slot each, both in range) and made
// contiguous, so the loops over raw pointers below cannot read or write out of bounds.
DecodeModel::StepInput DecodeModel::step_input(const torch::Tensor& x,
                                               const torch::Tensor& positions,
                                               const torch::Tensor& out_loc) const {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be float32 [rows, H]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && out_loc.scalar_type() == torch::kInt64,
              "positions and out_loc must be int64");
  StepInput in{x.contiguous().clone(), positions.contiguous(), out_loc.contiguous()};
  const int64_t rows = x.size(0);
  TORCH_CHECK(in.positions.numel() == rows && in.out_loc.numel() == rows,
              "one position and slot per row");
  const int64_t* pos = in.positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_.size(0), "position out of range: ", pos[b]);
  const int64_t slots_in_pool = layers_.empty() ? 0 : layers_[0].k_buffer.size(0);
  const int64_t* loc = in.out_loc.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK(loc[b] >= 0 && loc[b] < slots_in_pool, "KV slot out of range: ", loc[b]);
  return in;
}

// Every layer over the step's rows; attention(q [rows, Hq, D], layer index) -> [rows, Hq, D]
// runs after the layer's new K/V rows are written. The MLP goes kMlpRows rows at a time, so
// a prefill's [rows, 2 * I] activations stay in cache between gate_up, silu * up and down.
// Returns the final hidden states (before the final norm).
template <typename Attention>
torch::Tensor DecodeModel::layers(const StepInput& in, Attention&& attention) const {
  torch::Tensor x = in.x;
  const int64_t rows = x.size(0), qd = hq_ * d_;
  const int64_t* pos = in.positions.data_ptr<int64_t>();
  const int64_t* loc = in.out_loc.data_ptr<int64_t>();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = layers_[i];
    torch::Tensor attn = attention(attention_input(layer, x, pos, loc), i).reshape({rows, qd});
    x.add_(with_lora(layer, kLoraO, attn, layer.o(attn), 0));
    torch::Tensor h = rms_norm(x, layer.post_attention_norm, eps_);
    for (int64_t r0 = 0; r0 < rows; r0 += kMlpRows) {
      const int64_t n = std::min(kMlpRows, rows - r0);
      torch::Tensor hn = h.narrow(0, r0, n);
      torch::Tensor act = silu_mul(with_lora(layer, kLoraGateUp, hn, layer.gate_up(hn), r0)
                                       .contiguous());
      x.narrow(0, r0, n).add_(with_lora(layer, kLoraDown, act, layer.down(act), r0));
    }
  }
  return x;
}

// The layer's input norm and qkv product; RoPE on q and k, the new K/V rows written to the
// pool. Returns q [rows, Hq, D] (contiguous).
torch::Tensor DecodeModel::attention_input(const Layer& layer, const torch::Tensor& x,
                                           const int64_t* pos, const int64_t* loc) const {
  const int64_t B = x.size(0), qd = hq_ * d_, kvd = hkv_ * d_;
  torch::Tensor normed = rms_norm(x, layer.input_norm, eps_);
  torch::Tensor qkv = with_lora(layer, kLoraQkv, normed, layer.qkv(normed), 0).contiguous();
  TORCH_CHECK(qkv.size(1) == qd + 2 * kvd, "qkv width does not match the heads");
  const bool half = layer.k_buffer.scalar_type() == torch::kBFloat16;
  void* kb = layer.k_buffer.data_ptr();
  void* vb = layer.v_buffer.data_ptr();
  float* qkvp = qkv.data_ptr<float>();
  const float* cos = cos_.data_ptr<float>();
  const float* sin = sin_.data_ptr<float>();
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* row = qkvp + b * (qd + 2 * kvd);
      rotate(row, hq_ + hkv_, d_, cos + pos[b] * d_, sin + pos[b] * d_);  // q, k adjacent
      store_kv(kb, vb, half, loc[b] * kvd, row + qd, kvd);
    }
  });
  return qkv.narrow(1, 0, qd).reshape({B, hq_, d_}).contiguous();
}

}  // namespace layer_step
