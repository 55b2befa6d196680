// CPU helpers shared by the kernels: instruction-set clones of the hot loops and sharding over
// TensorFlow's CPU worker pool. No CUDA here (g++ only).
#ifndef KERASDET_COMMON_CPU_PARALLEL_H_
#define KERASDET_COMMON_CPU_PARALLEL_H_

#include <cstdint>
#include <functional>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/util/work_sharder.h"

// A function marked KD_CPU_CLONES is compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (GCC function multi-versioning): the library itself is built with TensorFlow's
// portable flags, which alone would leave the channel loops at 128-bit SSE. The clones are named by
// instruction set, not "arch=skylake-avx512" / "arch=haswell": an arch= clone is chosen only on that
// very Intel CPU model (__builtin_cpu_is), so AVX-512 AMD CPUs (Zen 4) ran the SSE copy. GCC does
// not clone templates: mark a non-template function and let it inline the templated loops.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KD_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KD_CPU_CLONES
#endif

namespace kerasdet {

// Threads of the CPU worker pool the op runs on.
inline int CpuThreads(tensorflow::OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
}

// work(begin, end) over [0, units) split across the CPU worker pool (tensorflow::Shard; `cost` is
// the estimated cost of one unit, which decides how finely it splits).
inline void ShardOnCpu(tensorflow::OpKernelContext* ctx, int64_t units, int64_t cost,
                       const std::function<void(int64_t, int64_t)>& work) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, units, cost, work);
}

}  // namespace kerasdet

#endif  // KERASDET_COMMON_CPU_PARALLEL_H_
