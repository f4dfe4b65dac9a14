// One step of a Llama-family model (Llama, SmolLM2, Mistral, Qwen2) in C++: every layer, the
// final norm and the LM head in a single call from Python, for a decode batch (forward,
// hidden) or a prefill batch (extend). src/layer_step.cpp says why and what holds.
#pragma once

#include <torch/extension.h>

#include <array>
#include <cstdint>
#include <vector>

namespace layer_step {

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

  static Linear dense(torch::Tensor weight, c10::optional<torch::Tensor> bias);
  static Linear packed(torch::Tensor weight, c10::optional<torch::Tensor> bias);
  // compact: `weight`'s lossless smaller form for panel_gemm::linear_with_form, or empty
  static Linear panel(torch::Tensor weight, int64_t out_features,
                      c10::optional<torch::Tensor> bias, std::vector<torch::Tensor> compact);
  static Linear quantized(torch::Tensor qs, torch::Tensor scales,
                          c10::optional<torch::Tensor> mins, int64_t bits, int64_t group,
                          bool int8_activations, c10::optional<torch::Tensor> bias);

  torch::Tensor operator()(const torch::Tensor& x) const;
};

// A projection's LoRA buffers over the adapter pool's slots (plait/lora/pool.py's layout):
// a [slots, K, in], bt [slots, K, out] (B transposed); undefined where no adapter targets the
// projection.
struct LoraWeights {
  torch::Tensor a, bt;
};

// The projections a LoRA adapter may wrap, indices into Layer::lora.
enum LoraTarget { kLoraQkv = 0, kLoraO = 1, kLoraGateUp = 2, kLoraDown = 3 };

struct Layer {
  torch::Tensor input_norm, post_attention_norm;  // [H] float32
  Linear qkv, o, gate_up, down;
  torch::Tensor k_buffer, v_buffer;  // this layer's paged pool, [S, Hkv, D] float32 or bf16
  std::array<LoraWeights, 4> lora;   // by LoraTarget
};

class DecodeModel {
 public:
  DecodeModel(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
              double scale, torch::Tensor cos, torch::Tensor sin, torch::Tensor final_norm,
              Linear lm_head);

  void add_layer(torch::Tensor input_norm, Linear qkv, Linear o, torch::Tensor post_norm,
                 Linear gate_up, Linear down, torch::Tensor k_buffer, torch::Tensor v_buffer);

  // The adapter pool's buffers for one projection (target: a LoraTarget) of layer `layer`;
  // the pool updates them in place when it loads an adapter into a slot.
  void set_layer_lora(int64_t layer, int64_t target, torch::Tensor a, torch::Tensor bt);

  // The next steps' adapters: row_slots [rows] int64 (each row's slot, -1: the base model),
  // scaling [slots] float32. Until clear_lora, every step adds each row's LoRA deltas
  // (lora_delta.h) after the projections that have buffers.
  void set_lora(torch::Tensor row_slots, torch::Tensor scaling);
  void clear_lora();

  // x [B, H]: the new tokens' embeddings; positions, out_loc [B]; slots [B, L] and seq_lens [B]
  // as decode_attention::attend takes them (each request's KV slots, the new token's
  // included). Returns the logits [B, V].
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, torch::Tensor out_loc,
                        torch::Tensor slots, torch::Tensor seq_lens);

  // forward without the LM head: the final-normed hidden states [B, H] it would multiply
  // (for a head of the caller's, the greedy screen of greedy_head.h).
  torch::Tensor hidden(torch::Tensor x, torch::Tensor positions, torch::Tensor out_loc,
                       torch::Tensor slots, torch::Tensor seq_lens);

  // A prefill (extend) batch: x [T, H] the new tokens' embeddings, positions and out_loc [T],
  // logits_rows [N] the rows to project to logits. Attention over the paged pool is the
  // caller's: attend(q [T, Hq, D], layer index) -> [T, Hq, D], called after this layer's new
  // K/V rows are written (the CPU backend's extend attention, cascade for shared prefixes
  // included). Returns the logits [N, V].
  torch::Tensor extend(torch::Tensor x, torch::Tensor positions, torch::Tensor out_loc,
                       torch::Tensor logits_rows, py::function attend);

 private:
  struct StepInput {
    torch::Tensor x;  // the residual stream: a copy, updated in place
    torch::Tensor positions, out_loc;
  };

  StepInput step_input(const torch::Tensor& x, const torch::Tensor& positions,
                       const torch::Tensor& out_loc) const;
  template <typename Attention>
  torch::Tensor layers(const StepInput& in, Attention&& attention) const;
  torch::Tensor attention_input(const Layer& layer, const torch::Tensor& x, const int64_t* pos,
                                const int64_t* loc) const;
  // y (a projection's output for rows r0 .. r0 + y.size(0) of the step, input x) plus the
  // rows' LoRA deltas, where set_lora is active and the projection has buffers.
  torch::Tensor with_lora(const Layer& layer, LoraTarget target, const torch::Tensor& x,
                          torch::Tensor y, int64_t r0) const;

  int64_t hq_, hkv_, d_;
  float eps_;
  double scale_;
  torch::Tensor cos_, sin_, final_norm_;
  Linear lm_head_;
  std::vector<Layer> layers_;
  torch::Tensor lora_rows_, lora_scaling_;  // undefined: no adapters in this step
};

}  // namespace layer_step
