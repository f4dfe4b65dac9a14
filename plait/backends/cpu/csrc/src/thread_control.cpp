// The calling thread's OpenMP team size, for plait/backends/cpu/threads.py (see there for why).
//
// torch sizes a thread's team lazily, from its global thread count, the first time that thread
// enters at::parallel_for; the lazy initialisation runs first here, so it can never later
// override the size set for this thread.
#include "plait_cpu/thread_control.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace thread_control {

namespace {

// MKL (torch's BLAS on x86) sizes its own OpenMP regions from its count, which
// torch.set_num_threads sets for the whole process: a GEMM on a one-thread host thread would
// still start a team of that size. mkl_set_num_threads_local overrides it for the calling
// thread (0: follow the global count again); looked up at run time, since torch builds
// without MKL do not have it. The C entry point is MKL_Set_Num_Threads_Local (mkl_service.h
// maps mkl_set_num_threads_local to it); the lower-case symbol is the Fortran one, which takes
// a pointer.
void set_mkl_threads_here(int threads) {
  using Fn = int (*)(int);
  static const Fn fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  if (fn != nullptr) fn(threads);
}

}  // namespace

void set_thread_parallelism(int64_t threads, int64_t mkl_threads) {
  TORCH_CHECK(threads >= 1, "threads must be >= 1, got ", threads);
  TORCH_CHECK(mkl_threads >= 0, "mkl_threads must be >= 0, got ", mkl_threads);
  at::internal::lazy_init_num_threads();
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(threads));
#endif
  set_mkl_threads_here(static_cast<int>(mkl_threads));
}

// Releases the calling thread's OpenMP team: libgomp keeps a thread's team workers between
// regions and counts them towards its "more threads than CPUs" throttle for as long as the
// thread lives. omp_pause_resource_all (OpenMP 5.0) frees the pool of the thread calling it
// (libgomp's gomp_pause_host), so a thread that started a team (torch.set_num_threads, an
// earlier parallel op) owns none afterwards, until its next parallel region.
bool release_team() {
#ifdef _OPENMP
  return omp_pause_resource_all(omp_pause_soft) == 0;
#else
  return true;
#endif
}

}  // namespace thread_control
