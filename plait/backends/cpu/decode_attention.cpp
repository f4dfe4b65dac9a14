// Python binding of the paged decode attention in decode_attention_kernel.h (see there).
#include "decode_attention_kernel.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "paged decode attention, K/V read in place (float32)");
}
