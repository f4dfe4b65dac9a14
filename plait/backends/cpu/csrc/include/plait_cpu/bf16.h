// bfloat16 values stored as their 16 bits (a float32's high half), for the bf16 KV pool:
// the layer step rounds its new K/V rows to them, the decode attention kernel widens them back
// to float32 as it loads them (bf16 -> float32 is exact: the low half is zero). Plain C++ and
// GCC vector extensions, so every SIMD level compiles it; no AVX512-BF16 instruction is needed.
#pragma once

#include <cstdint>
#include <cstring>

#include "plait_cpu/simd.h"

namespace bf16 {

// The float32 whose high half is h (exact).
inline float widen(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline float widen(float x) { return x; }

// x rounded to the nearest bfloat16, ties to even, as torch's .to(torch.bfloat16) rounds
// (a NaN stays a quiet NaN), so the native step's KV equals the eager step's.
inline uint16_t round(float x) {
  uint32_t w;
  std::memcpy(&w, &x, sizeof(w));
  if ((w & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((w >> 16) | 0x40u);
  w += 0x7fffu + ((w >> 16) & 1u);
  return static_cast<uint16_t>(w >> 16);
}

// 16 consecutive values widened to float32 (one vector load of 32 bytes).
inline simd::Vec16 load16(const uint16_t* p) {
  typedef uint16_t Half16 __attribute__((vector_size(32)));
  typedef uint32_t Word16 __attribute__((vector_size(64)));
  Half16 h;
  std::memcpy(&h, p, sizeof(h));
  const Word16 w = __builtin_convertvector(h, Word16) << 16;
  simd::Vec16 out;
  std::memcpy(&out, &w, sizeof(out));
  return out;
}

inline simd::Vec16 load16(const float* p) { return simd::load16(p); }

}  // namespace bf16
