// Python binding of greedy_head.h (the bfloat16-screened exact greedy LM head).
#include "greedy_head.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &greedy_head::available, "whether this build and CPU have AVX-512 BF16");
  m.def("bound_factor", &greedy_head::bound_factor, py::arg("k"),
        "f of the screen's bound f * ||x|| * ||W_j||");
  m.def("pack", &greedy_head::pack, py::arg("panels"), py::arg("vocab"));
  m.def("argmax", &greedy_head::argmax, py::arg("x"), py::arg("packed"), py::arg("norms"),
        py::arg("panels"));
}
