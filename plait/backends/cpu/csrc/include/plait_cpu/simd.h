// What each SIMD level compiles (plait/backends/cpu/cpp_build.py picks the level's flags), and
// the 16-float vector helpers the decode attention kernel and the layer step share.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PLAIT_AVX2 1
#endif
#if defined(PLAIT_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define PLAIT_VNNI 1
#endif

namespace simd {

// The instruction set this build targets: "avx512vnni" (qmatmul_q8 exists), "avx2" or
// "portable".
std::string level();

// 16 floats as one GCC vector: zmm, ymm pairs or SSE quads, as the build's flags allow.
typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
constexpr int64_t kLanes = 16;

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0 (scores minus their running max), to ~1 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, 2^n put into the exponent bits; below
// -87 (or -inf, a padding score) the result is 0. Sixteen at a time: one scalar std::exp per
// score cost as much as reading the score's K and V rows.
inline Vec16 exp_nonpositive(Vec16 x) {
  typedef int32_t VecI16 __attribute__((vector_size(64)));
  const VecI16 underflow = x < -87.f;
  x = x < -87.f ? -87.f : x;
  const Vec16 shifter = Vec16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 n = (x * 1.44269504088896341f + shifter) - shifter;
  const Vec16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec16 p = Vec16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Vec16 e = p * r * r + r + 1.f;
  const VecI16 bits = (__builtin_convertvector(n, VecI16) + 127) << 23;
  Vec16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const Vec16 y = e * two_n;
  VecI16 ybits;
  std::memcpy(&ybits, &y, sizeof(ybits));
  ybits &= ~underflow;
  Vec16 out;
  std::memcpy(&out, &ybits, sizeof(out));
  return out;
}

}  // namespace simd
