// simd::level, here so that it names the flags this module was built with.
#include "plait_cpu/simd.h"

namespace simd {

std::string level() {
#if defined(PLAIT_VNNI)
  return "avx512vnni";
#elif defined(PLAIT_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace simd
