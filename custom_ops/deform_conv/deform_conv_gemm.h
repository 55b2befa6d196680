// Single-precision matrix product for the CPU deformable-convolution kernels.
#ifndef KERASDET_DEFORM_CONV_DEFORM_CONV_GEMM_H_
#define KERASDET_DEFORM_CONV_DEFORM_CONV_GEMM_H_

#include <stdint.h>

#include <functional>

namespace kerasdet {
namespace deform_conv {

// Runs work(begin, end) over [0, total) split across threads; cost is per unit, in cycles.
using ParallelFor = std::function<void(int64_t total, int64_t cost,
                                       const std::function<void(int64_t, int64_t)>& work)>;

// c[m, n] (+)= sum_k op(a)[m, k] * op(b)[k, n], all row-major and dense. op(a) = a^T when trans_a
// (a is stored [k, m]), op(b) = b^T when trans_b (b is stored [n, k]). With accumulate, c is added
// to; otherwise it is overwritten.
void Sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
           const float* b, float* c, bool accumulate, const ParallelFor& parallel_for);

}  // namespace deform_conv
}  // namespace kerasdet

#endif  // KERASDET_DEFORM_CONV_DEFORM_CONV_GEMM_H_
