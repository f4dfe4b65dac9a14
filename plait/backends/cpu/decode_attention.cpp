// Python binding of the paged decode attention in decode_attention_kernel.h (see there).
#include "decode_attention_kernel.h"

// The shared-prefix groups decode_attention would form for this batch, as (first, count,
// length) triples: what the tests check the kernel's grouping against, and the grouping the
// extend cascade (plait/backends/cpu/shared_prefix.py) uses too.
std::vector<std::tuple<int64_t, int64_t, int64_t>> shared_groups(torch::Tensor slots,
                                                                  torch::Tensor seq_lens) {
  std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
  for (const auto& g : decode_shared_groups(slots, seq_lens)) out.emplace_back(g.first, g.count, g.len);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention",
        [](torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
           torch::Tensor seq_lens, double scale) {
          return decode_attention(q, k, v, slots, seq_lens, scale);
        },
        "paged decode attention, K/V read in place (float32)");
  m.def("shared_groups", &shared_groups,
        "the groups of requests whose shared prefix decode_attention reads once");
  m.attr("MIN_SHARED") = decode_attention_detail::kMinShared;
}
