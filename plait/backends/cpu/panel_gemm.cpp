// Python binding of panel_gemm.h (plait/backends/cpu/linear.py packs float32 Linear weights
// with it); decode_step.cpp includes the header and calls the same kernel.
#include "panel_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
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
