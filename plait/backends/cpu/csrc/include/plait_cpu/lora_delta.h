// Batched LoRA deltas for the native layer step: each row of a batch adds the low-rank product
// of its own adapter (S-LoRA/Punica's segmented shrink and expand, one row at a time, no
// weights merged). src/lora_delta.cpp says why and what holds.
#pragma once

#include <torch/extension.h>

namespace lora_delta {

// y[r] += ((a[s] @ x[r]) @ bt[s]) * scaling[s] for every row r whose slot s = row_slots[r] is
// >= 0; rows with slot -1 (the base model) are untouched.
// x [R, in], y [R, out] (contiguous float32, updated in place), a [S, K, in], bt [S, K, out]
// (lora_B transposed), row_slots [R] int64, scaling [S] float32.
void add(const torch::Tensor& x, torch::Tensor& y, const torch::Tensor& a,
         const torch::Tensor& bt, const torch::Tensor& row_slots, const torch::Tensor& scaling);

}  // namespace lora_delta
