// Python bindings of the quantized matmul kernels in qmatmul_kernels.h (see there).
#include "qmatmul_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "weight-only quantized matmul (see plait/quant/formats.py)");
#ifdef PLAIT_VNNI
  m.def("qmatmul_q8", &qmatmul_q8, "qmatmul with int8 activations and VNNI dot products");
  m.def("quantize_activations_q8", &quantize_activations_q8, "qmatmul_q8's int8 activations");
#endif
  m.def("simd_level", &simd_level, "the instruction set this build targets");
}
