// The calling thread's OpenMP team, for plait/backends/cpu/threads.py (see there for why).
#pragma once

#include <cstdint>

namespace thread_control {

// threads: the OpenMP team size of parallel regions the calling thread starts from now on;
// mkl_threads: MKL's count on this thread (0: MKL's global count).
void set_thread_parallelism(int64_t threads, int64_t mkl_threads);

// Frees the calling thread's OpenMP team (omp_pause_resource_all); false if refused.
bool release_team();

}  // namespace thread_control
