// The CPU backend's one native module: a submodule per kernel (plait/backends/cpu/cpp_build.py
// builds it once per SIMD level; the Python wrappers beside it pick their submodule).
#include <torch/extension.h>

#include <vector>

#include "plait_cpu/decode_attention.h"
#include "plait_cpu/greedy_head.h"
#include "plait_cpu/layer_step.h"
#include "plait_cpu/panel_gemm.h"
#include "plait_cpu/qmatmul.h"
#include "plait_cpu/simd.h"
#include "plait_cpu/thread_control.h"

namespace {

void bind_panel_gemm(py::module_ m) {
  m.def("pack", &panel_gemm::pack, py::arg("weight"),
        "W [N, K] float32 -> the panel layout [ceil(N / 48), K, 48]");
  m.def("linear", &panel_gemm::linear, py::arg("x"), py::arg("packed"), py::arg("out_features"),
        py::arg("bias") = py::none(), "x [..., K] @ W^T (+ bias) from the packed weight");
  m.def("encode_affine4", &panel_gemm::encode_affine4, py::arg("packed"),
        "pack()'s panels as 4-bit codes [codes, scales, offsets] that decode to the same "
        "float32 bit for bit, or [] where a value is off its 32-row block's grid");
  m.def("linear_affine4", &panel_gemm::linear_affine4, py::arg("x"), py::arg("codes"),
        py::arg("scales"), py::arg("offsets"), py::arg("out_features"),
        py::arg("bias") = py::none(), "linear() from encode_affine4's form, the same bits");
  m.def("encode_bf16", &panel_gemm::encode_bf16, py::arg("packed"),
        "pack()'s panels as their high 16-bit halves [halves], or [] where a low half is not 0");
  m.def("linear_bf16", &panel_gemm::linear_bf16, py::arg("x"), py::arg("halves"),
        py::arg("out_features"), py::arg("bias") = py::none(),
        "linear() from encode_bf16's halves, the same bits");
  m.def("linear_with_form", &panel_gemm::linear_with_form, py::arg("x"), py::arg("packed"),
        py::arg("form"), py::arg("out_features"), py::arg("bias") = py::none(),
        "the product from whichever form of the weight reads fastest (the same bits)");
  m.attr("register_decode_rows") = panel_gemm::kRegisterDecodeRows;
  m.def("has_simd_kernel", &panel_gemm::has_simd_kernel,
        "whether this build has the AVX-512 kernel (else the portable loop)");
}

void bind_qmatmul(py::module_ m) {
  m.def("qmatmul", &qmatmul::qmatmul, "weight-only quantized matmul (see plait/quant/formats.py)");
#ifdef PLAIT_VNNI
  m.def("qmatmul_q8", &qmatmul::qmatmul_q8,
        "qmatmul with int8 activations and VNNI dot products");
  m.def("quantize_activations_q8", &qmatmul::quantize_activations_q8,
        "qmatmul_q8's int8 activations");
#endif
  m.def("simd_level", &simd::level, "the instruction set this build targets");
}

// The shared-prefix groups attend would form for this batch, as (first, count, length)
// triples: what the tests check the kernel's grouping against, and the grouping the extend
// cascade (plait/backends/cpu/shared_prefix.py) uses too.
std::vector<std::tuple<int64_t, int64_t, int64_t>> shared_groups(torch::Tensor slots,
                                                                  torch::Tensor seq_lens) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
  for (const auto& g : decode_attention::shared_groups(slots, seq_lens))
    out.emplace_back(g.first, g.count, g.len);
  return out;
}

void bind_decode_attention(py::module_ m) {
  m.def("decode_attention",
        [](torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
           torch::Tensor seq_lens, double scale) {
          return decode_attention::attend(q, k, v, slots, seq_lens, scale);
        },
        "paged decode attention, K/V read in place (float32 q; float32 or bfloat16 K/V)");
  m.def("shared_groups", &shared_groups,
        "the groups of requests whose shared prefix decode_attention reads once");
  m.attr("MIN_SHARED") = decode_attention::kMinShared;
}

void bind_greedy_head(py::module_ m) {
  m.def("available", &greedy_head::available, "whether this build and CPU have AVX-512 BF16");
  m.def("bound_factor", &greedy_head::bound_factor, py::arg("k"),
        "f of the screen's bound f * ||x|| * ||W_j||");
  m.def("pack", &greedy_head::pack, py::arg("panels"), py::arg("vocab"));
  m.def("argmax", &greedy_head::argmax, py::arg("x"), py::arg("packed"), py::arg("norms"),
        py::arg("panels"));
}

void bind_layer_step(py::module_ m) {
  using layer_step::DecodeModel;
  using layer_step::Linear;
  // module_local: each SIMD level's module registers its own types (a process may load two)
  py::class_<Linear>(m, "Linear", py::module_local(),
                     "a Linear layer's product, whichever form holds its weight")
      .def_static("dense", &Linear::dense, py::arg("weight"), py::arg("bias"))
      .def_static("packed", &Linear::packed, py::arg("weight"), py::arg("bias"))
      .def_static("panel", &Linear::panel, py::arg("weight"), py::arg("out_features"),
                  py::arg("bias"), py::arg("compact") = std::vector<torch::Tensor>())
      .def_static("quantized", &Linear::quantized, py::arg("qs"), py::arg("scales"),
                  py::arg("mins"), py::arg("bits"), py::arg("group"),
                  py::arg("int8_activations"), py::arg("bias"))
      .def("__call__", &Linear::operator());
  py::class_<DecodeModel>(m, "DecodeModel", py::module_local(),
                          "a Llama-family step (decode or prefill) in one call")
      .def(py::init<int64_t, int64_t, int64_t, double, double, torch::Tensor, torch::Tensor,
                    torch::Tensor, Linear>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("cos"), py::arg("sin"), py::arg("final_norm"),
           py::arg("lm_head"))
      .def("add_layer", &DecodeModel::add_layer)
      .def("set_layer_lora", &DecodeModel::set_layer_lora, py::arg("layer"), py::arg("target"),
           py::arg("a"), py::arg("bt"))
      .def("set_lora", &DecodeModel::set_lora, py::arg("row_slots"), py::arg("scaling"))
      .def("clear_lora", &DecodeModel::clear_lora)
      .def("forward", &DecodeModel::forward)
      .def("hidden", &DecodeModel::hidden)
      .def("extend", &DecodeModel::extend, py::arg("x"), py::arg("positions"),
           py::arg("out_loc"), py::arg("logits_rows"), py::arg("attend"));
}

void bind_thread_control(py::module_ m) {
  m.def("set_thread_parallelism", &thread_control::set_thread_parallelism,
        "the OpenMP team size (and MKL's count, 0: its global one) of parallel regions "
        "started by the calling thread");
  m.def("release_team", &thread_control::release_team,
        "free the calling thread's OpenMP team (omp_pause_resource_all); False if refused");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd_level", &simd::level, "the instruction set this build targets");
  bind_panel_gemm(m.def_submodule("panel_gemm", "float32 products from packed column panels"));
  bind_qmatmul(m.def_submodule("qmatmul", "weight-only quantized matmul"));
  bind_decode_attention(m.def_submodule("decode_attention", "paged decode attention"));
  bind_greedy_head(m.def_submodule("greedy_head", "the bfloat16-screened exact greedy head"));
  bind_layer_step(m.def_submodule("layer_step", "a whole model step in one call"));
  bind_thread_control(m.def_submodule("thread_control", "per-thread OpenMP teams"));
}
