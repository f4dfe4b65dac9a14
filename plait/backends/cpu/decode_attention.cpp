// Python binding of the paged decode attention in decode_attention_kernel.h (see there).
#include "decode_attention_kernel.h"

// The shared-prefix groups decode_attention would form for this batch, as (first, count,
// length) triples: what the tests check the kernel's grouping against.
std::vector<std::tuple<int64_t, int64_t, int64_t>> shared_groups(torch::Tensor slots,
                                                                  torch::Tensor seq_lens) {
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && seq_lens.scalar_type() == torch::kInt64,
              "slots and seq_lens must be int64");
  slots = slots.contiguous();
  seq_lens = seq_lens.contiguous();
  std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
  for (const auto& g : decode_attention_detail::shared_groups(
           slots.data_ptr<int64_t>(), slots.size(0), slots.size(1), seq_lens.data_ptr<int64_t>()))
    out.emplace_back(g.first, g.count, g.len);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "paged decode attention, K/V read in place (float32)");
  m.def("shared_groups", &shared_groups,
        "the groups of requests whose shared prefix decode_attention reads once");
}
