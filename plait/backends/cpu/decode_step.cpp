// One decode step of a Llama-family model (Llama, SmolLM2, Mistral, Qwen2) in C++: every layer,
// the final norm and the LM head in a single call from Python.
//
// Why: at batch 1 the eager torch step of SmolLM2-135M runs ~40 tensor ops per layer, each a
// Python call and a dispatch of a few microseconds, plus nn.Module overhead; with GGUF weights
// and the VNNI kernel the matrix products are ~5 ms of a ~34 ms step. Here the glue between the
// products (RMSNorm, RoPE, the KV write, SiLU * up, the residual adds) is a plain loop over
// the rows, and the products call the same kernels the eager path calls:
//   - quantized weights: qmatmul / qmatmul_q8 from qmatmul_kernels.h;
//   - panel-packed float32 weights: panel_gemm::linear_with_form from panel_gemm.h (the
//     float32 panels, or the weight's lossless 4-bit or 16-bit form where it has one);
//   - oneDNN-packed float32 weights: onednn_linear (mkldnn::_linear_pointwise) from
//     qmatmul_kernels.h;
//   - plain float32 weights: at::linear.
// Attention is decode_attention from decode_attention_kernel.h over the paged pool.
//
// The arithmetic follows plait/models/llama.py op for op (fp32 RMSNorm as weight * (x * r),
// RoPE as x * cos + rotate_half(x) * sin, silu(g) * u), so results differ from the eager step
// only by float rounding (sum order in the norm, exp's last bits), as the paged attention
// kernel already does. It is built with -ffp-contract=off (plait/backends/cpu/cpp_build.py):
// a fused multiply-add would round RoPE and the norm differently from torch's separate
// multiply and add.
//
// Holds: float32 activations, weights and KV; one new token per row; tensor parallelism 1.
// plait/backends/cpu/native_decode.py builds a DecodeModel only for models that meet this.
#include "decode_attention_kernel.h"
#include "panel_gemm.h"
#include "qmatmul_kernels.h"

#include <cmath>
#include <string>
#include <vector>

namespace {

// A Linear layer's product y = x W^T + b, whichever form holds W.
struct Linear {
  enum Kind { kDense, kPacked, kPanel, kQuantized };
  Kind kind = kDense;
  // kDense: [N, K] float32; kPacked: oneDNN's opaque packed tensor; kPanel: panel_gemm::pack's
  torch::Tensor weight;
  int64_t out_features = 0;  // kPanel: N (the panels are padded to 48 columns)
  std::vector<torch::Tensor> compact;  // kPanel: a lossless smaller form of `weight`, or empty
  c10::optional<torch::Tensor> bias;
  torch::Tensor qs, scales;  // kQuantized: plait.quant.formats.QuantizedWeight's tensors
  c10::optional<torch::Tensor> mins;
  int64_t bits = 0, group = 0;
  bool int8_activations = false;

  static Linear dense(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
                "dense weight must be float32 [N, K]");
    Linear l;
    l.weight = weight.contiguous();
    l.bias = bias;
    return l;
  }

  static Linear packed(torch::Tensor weight, c10::optional<torch::Tensor> bias) {
    Linear l;
    l.kind = kPacked;
    l.weight = weight;
    l.bias = bias;
    return l;
  }

  // compact: `weight`'s lossless smaller form for panel_gemm::linear_with_form, or empty
  static Linear panel(torch::Tensor weight, int64_t out_features,
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

  static Linear quantized(torch::Tensor qs, torch::Tensor scales,
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

  torch::Tensor operator()(const torch::Tensor& x) const {
    switch (kind) {
      case kDense:
        return at::linear(x, weight, bias);
      case kPacked:
        return onednn_linear(x, weight, bias);
      case kPanel:
        return panel_gemm::linear_with_form(x, weight, compact, out_features, bias);
      case kQuantized: {
#ifdef PLAIT_VNNI
        torch::Tensor y = int8_activations ? qmatmul_q8(x, qs, scales, mins, bits, group)
                                           : qmatmul(x, qs, scales, mins, bits, group);
#else
        torch::Tensor y = qmatmul(x, qs, scales, mins, bits, group);
#endif
        if (bias.has_value() && bias->defined()) y.add_(*bias);
        return y;
      }
    }
    TORCH_CHECK(false, "unknown Linear kind");
  }
};

struct Layer {
  torch::Tensor input_norm, post_attention_norm;  // [H] float32
  Linear qkv, o, gate_up, down;
  torch::Tensor k_buffer, v_buffer;  // this layer's paged pool, [S, Hkv, D]
};

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
inline void rotate(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
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
// element was ~10 % of a batch-16 step, on one thread). silu(g) = g / (1 + e^-g) is computed
// as g / (1 + e) for g >= 0 and as g e / (1 + e) for g < 0, with e = exp(-|g|) <= 1: the same
// value, and the vector exp (decode_attention_kernel.h's, ~1 ulp) never overflows.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  namespace dd = decode_attention_detail;
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
      for (; i + dd::kLanes <= I; i += dd::kLanes) {
        const dd::Vec16 gv = dd::load16(g + i);
        const dd::Vec16 e = dd::exp_nonpositive(gv < 0.f ? gv : -gv);
        const dd::Vec16 num = gv < 0.f ? gv * e : gv;
        dd::store16(dst + i, num / (1.f + e) * dd::load16(u + i));
      }
      for (; i < I; ++i) dst[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

class DecodeModel {
 public:
  DecodeModel(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
              double scale, torch::Tensor cos, torch::Tensor sin, torch::Tensor final_norm,
              Linear lm_head)
      : hq_(num_heads), hkv_(num_kv_heads), d_(head_dim), eps_(static_cast<float>(eps)),
        scale_(scale), cos_(cos.contiguous()), sin_(sin.contiguous()),
        final_norm_(final_norm.contiguous()), lm_head_(std::move(lm_head)) {
    TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 1024, "head_dim must be even and <= 1024");
    TORCH_CHECK(cos_.dim() == 2 && cos_.size(1) == head_dim && sin_.sizes() == cos_.sizes() &&
                    cos_.scalar_type() == torch::kFloat32,
                "cos/sin must be float32 [max_positions, head_dim]");
  }

  void add_layer(torch::Tensor input_norm, Linear qkv, Linear o, torch::Tensor post_norm,
                 Linear gate_up, Linear down, torch::Tensor k_buffer, torch::Tensor v_buffer) {
    TORCH_CHECK(k_buffer.is_contiguous() && v_buffer.is_contiguous() &&
                    k_buffer.scalar_type() == torch::kFloat32 && k_buffer.size(1) == hkv_ &&
                    k_buffer.size(2) == d_ && v_buffer.sizes() == k_buffer.sizes(),
                "KV buffers must be contiguous float32 [S, Hkv, D]");
    layers_.push_back(Layer{input_norm.contiguous(), post_norm.contiguous(), std::move(qkv),
                            std::move(o), std::move(gate_up), std::move(down), k_buffer,
                            v_buffer});
  }

  // x [B, H]: the new tokens' embeddings; positions, out_loc [B]; slots [B, L] and seq_lens [B]
  // as decode_attention takes them (each request's KV slots, the new token's included).
  // Returns the logits [B, V].
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor out_loc,
                        torch::Tensor slots, torch::Tensor seq_lens) {
    return lm_head_(hidden(x, positions, out_loc, slots, seq_lens));
  }

  // forward without the LM head: the final-normed hidden states [B, H] it would multiply
  // (for a head of the caller's, the greedy screen of greedy_head.h).
  torch::Tensor hidden(torch::Tensor x, torch::Tensor positions, torch::Tensor out_loc,
                       torch::Tensor slots, torch::Tensor seq_lens) {
    // the batch's shared prefixes are the same in every layer: formed once
    const auto groups = decode_shared_groups(slots, seq_lens);
    x = layers(step_input(x, positions, out_loc), [&](const torch::Tensor& q, size_t i) {
      return decode_attention(q, layers_[i].k_buffer, layers_[i].v_buffer, slots, seq_lens,
                              scale_, &groups);
    });
    return rms_norm(x, final_norm_, eps_);
  }

  // A prefill (extend) batch: x [T, H] the new tokens' embeddings, positions and out_loc [T],
  // logits_rows [N] the rows to project to logits. Attention over the paged pool is the
  // caller's: attend(q [T, Hq, D], layer index) -> [T, Hq, D], called after this layer's new
  // K/V rows are written (the CPU backend's extend attention, cascade for shared prefixes
  // included). Returns the logits [N, V].
  torch::Tensor extend(torch::Tensor x, torch::Tensor positions, torch::Tensor out_loc,
                       torch::Tensor logits_rows, py::function attend) {
    x = layers(step_input(x, positions, out_loc), [&](const torch::Tensor& q, size_t i) {
      torch::Tensor attn = attend(q, static_cast<int64_t>(i)).cast<torch::Tensor>();
      TORCH_CHECK(attn.sizes() == q.sizes() && attn.scalar_type() == torch::kFloat32,
                  "attend must return float32 [T, Hq, D]");
      return attn;
    });
    return lm_head_(rms_norm(x.index_select(0, logits_rows), final_norm_, eps_));
  }

 private:
  static constexpr int64_t kMlpRows = 1024;

  struct StepInput {
    torch::Tensor x;  // the residual stream: a copy, updated in place
    torch::Tensor positions, out_loc;
  };

  // A step's rows checked (dtypes, one position and slot each, both in range) and made
  // contiguous, so the loops over raw pointers below cannot read or write out of bounds.
  StepInput step_input(const torch::Tensor& x, const torch::Tensor& positions,
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
  torch::Tensor layers(const StepInput& in, Attention&& attention) const {
    torch::Tensor x = in.x;
    const int64_t rows = x.size(0), qd = hq_ * d_;
    const int64_t* pos = in.positions.data_ptr<int64_t>();
    const int64_t* loc = in.out_loc.data_ptr<int64_t>();
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      torch::Tensor attn = attention(attention_input(layer, x, pos, loc), i);
      x.add_(layer.o(attn.reshape({rows, qd})));
      torch::Tensor h = rms_norm(x, layer.post_attention_norm, eps_);
      for (int64_t r0 = 0; r0 < rows; r0 += kMlpRows) {
        const int64_t n = std::min(kMlpRows, rows - r0);
        torch::Tensor gate_up = layer.gate_up(h.narrow(0, r0, n));
        x.narrow(0, r0, n).add_(layer.down(silu_mul(gate_up.contiguous())));
      }
    }
    return x;
  }

  // The layer's input norm and qkv product; RoPE on q and k, the new K/V rows written to the
  // pool. Returns q [rows, Hq, D] (contiguous).
  torch::Tensor attention_input(const Layer& layer, const torch::Tensor& x, const int64_t* pos,
                                const int64_t* loc) const {
    const int64_t B = x.size(0), qd = hq_ * d_, kvd = hkv_ * d_;
    torch::Tensor qkv = layer.qkv(rms_norm(x, layer.input_norm, eps_)).contiguous();
    TORCH_CHECK(qkv.size(1) == qd + 2 * kvd, "qkv width does not match the heads");
    float* kb = layer.k_buffer.data_ptr<float>();
    float* vb = layer.v_buffer.data_ptr<float>();
    float* qkvp = qkv.data_ptr<float>();
    const float* cos = cos_.data_ptr<float>();
    const float* sin = sin_.data_ptr<float>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* row = qkvp + b * (qd + 2 * kvd);
        rotate(row, hq_ + hkv_, d_, cos + pos[b] * d_, sin + pos[b] * d_);  // q, k adjacent
        std::memcpy(kb + loc[b] * kvd, row + qd, kvd * sizeof(float));
        std::memcpy(vb + loc[b] * kvd, row + qd + kvd, kvd * sizeof(float));
      }
    });
    return qkv.narrow(1, 0, qd).reshape({B, hq_, d_}).contiguous();
  }

  int64_t hq_, hkv_, d_;
  float eps_;
  double scale_;
  torch::Tensor cos_, sin_, final_norm_;
  Linear lm_head_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Linear>(m, "Linear", "a Linear layer's product, whichever form holds its weight")
      .def_static("dense", &Linear::dense, py::arg("weight"), py::arg("bias"))
      .def_static("packed", &Linear::packed, py::arg("weight"), py::arg("bias"))
      .def_static("panel", &Linear::panel, py::arg("weight"), py::arg("out_features"),
                  py::arg("bias"), py::arg("compact") = std::vector<torch::Tensor>())
      .def_static("quantized", &Linear::quantized, py::arg("qs"), py::arg("scales"),
                  py::arg("mins"), py::arg("bits"), py::arg("group"),
                  py::arg("int8_activations"), py::arg("bias"))
      .def("__call__", &Linear::operator());
  py::class_<DecodeModel>(m, "DecodeModel", "a Llama-family decode step in one call")
      .def(py::init<int64_t, int64_t, int64_t, double, double, torch::Tensor, torch::Tensor,
                    torch::Tensor, Linear>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("cos"), py::arg("sin"), py::arg("final_norm"),
           py::arg("lm_head"))
      .def("add_layer", &DecodeModel::add_layer)
      .def("forward", &DecodeModel::forward)
      .def("hidden", &DecodeModel::hidden)
      .def("extend", &DecodeModel::extend, py::arg("x"), py::arg("positions"),
           py::arg("out_loc"), py::arg("logits_rows"), py::arg("attend"));
  m.def("simd_level", &simd_level, "the instruction set this build targets");
}
