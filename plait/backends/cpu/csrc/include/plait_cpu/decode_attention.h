// Decode attention over the paged KV pool, reading each request's K/V rows in place
// (src/decode_attention.cpp says how and why).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace decode_attention {

constexpr int64_t kMinShared = 128;  // shortest common prefix worth the shared pass

// Consecutive requests first..first+count-1 whose first `len` KV slots are the same.
struct SharedGroup {
  int64_t first, count, len;
};

// The batch's shared-prefix groups: two or more consecutive requests sharing at least
// kMinShared leading slots, each keeping a tail of its own. Checks what it reads: int64
// slots [B, L] and seq_lens [B], each length in 1..L. A caller running several layers over one
// batch (the layer step) forms them once and passes them to attend.
std::vector<SharedGroup> shared_groups(torch::Tensor slots, torch::Tensor seq_lens);

// out[b, j] = softmax(q[b, j] . K[slots[b, :n_b], j / G]^T * scale) @ V[slots[b, :n_b], j / G]
// for q [B, Hq, D] float32, k_buf/v_buf [S, Hkv, D] (both float32 or both bfloat16,
// contiguous; bf16 values are widened to float32 as they are read), slots [B, L] int64 (row b's
// first seq_lens[b] entries are its KV slots), seq_lens [B] int64 (each >= 1). groups:
// shared_groups(slots, seq_lens), or null to form them here.
torch::Tensor attend(torch::Tensor q, torch::Tensor k_buf, torch::Tensor v_buf,
                     torch::Tensor slots, torch::Tensor seq_lens, double scale,
                     const std::vector<SharedGroup>* groups = nullptr);

}  // namespace decode_attention
