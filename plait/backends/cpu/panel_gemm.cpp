// Python binding of panel_gemm.h (plait/backends/cpu/linear.py packs float32 Linear weights
// with it); decode_step.cpp includes the header and calls the same kernel.
#include "panel_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &panel_gemm::pack, py::arg("weight"),
        "W [N, K] float32 -> the panel layout [ceil(N / 48), K, 48]");
  m.def("linear", &panel_gemm::linear, py::arg("x"), py::arg("packed"), py::arg("out_features"),
        py::arg("bias") = py::none(), "x [..., K] @ W^T (+ bias) from the packed weight");
  m.def("has_simd_kernel", &panel_gemm::has_simd_kernel,
        "whether this build has the AVX-512 kernel (else the portable loop)");
}
