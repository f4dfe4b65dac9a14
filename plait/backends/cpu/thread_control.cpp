// The calling thread's OpenMP team size, for plait/backends/cpu/threads.py (see there for why).
//
// torch sizes a thread's team lazily, from its global thread count, the first time that thread
// enters at::parallel_for; the lazy initialisation runs first here, so it can never later
// override the size set for this thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void set_thread_parallelism(int64_t threads) {
  TORCH_CHECK(threads >= 1, "threads must be >= 1, got ", threads);
  at::internal::lazy_init_num_threads();
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(threads));
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_thread_parallelism", &set_thread_parallelism,
        "the OpenMP team size of parallel regions started by the calling thread");
}
