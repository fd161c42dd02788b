// What the CPU kernels column_gram.cc and adam_products.cc share: the vector of eight float32
// lanes, the choice between their AVX2 and portable loops, and running a job's tasks on the
// XLA:CPU intra-op thread pool. Both kernels choose their loops by the same rule, so that the
// variant the extension module reports is the one every kernel runs.

#ifndef GRASSMANN_OPTAX_KERNEL_COMMON_H_
#define GRASSMANN_OPTAX_KERNEL_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The kernels build their loops twice: for the x86-64 baseline (128-bit SSE2) and for AVX2.
#define GRASSMANN_HAVE_AVX2_VARIANT 1
#endif

namespace grassmann_kernel {

constexpr int64_t kLanes = 8;

// Eight float32 lanes as a GCC/Clang vector: the AVX2 build does each operation in one 256-bit
// register, the baseline build in two 128-bit ones, lane for lane the same arithmetic.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

[[gnu::always_inline]] inline void LoadLanes(Lanes* v, const float* x) {
  __builtin_memcpy(v, x, sizeof(Lanes));
}

[[gnu::always_inline]] inline void StoreLanes(float* x, const Lanes* v) {
  __builtin_memcpy(x, v, sizeof(Lanes));
}

// Whether the AVX2 loops run: the processor has AVX2, and GRASSMANN_OPTAX_CPU_KERNEL_ISA is not
// "baseline" (which forces the portable loops, for tests that compare the two). Called once per
// kernel when the library is loaded.
inline bool UseAvx2() {
  const char* forced = std::getenv("GRASSMANN_OPTAX_CPU_KERNEL_ISA");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return false;
#ifdef GRASSMANN_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// Runs `job`'s tasks on the calling thread and on up to (pool threads - 1) pool tasks, and
// returns when all are done. `Job` has `tasks`, an atomic `done` and `Run()`, which claims tasks
// from a shared counter until none is left and adds to `done` for each it finishes. So the call
// finishes on the calling thread alone when no pool thread is free (no thread waits for a task
// that has not started), and a pool task that starts after the call has returned finds no task
// left and only drops its reference to the job.
template <typename Job>
void RunOnPool(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads, job->tasks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Run(); });
  job->Run();
  // Every task has been claimed; wait for the ones other threads are still running.
  while (job->done.load(std::memory_order_acquire) < job->tasks) std::this_thread::yield();
}

}  // namespace grassmann_kernel

#endif  // GRASSMANN_OPTAX_KERNEL_COMMON_H_
