// Raw-pointer launchers of the CUDA deformable-convolution kernels (deform_conv_kernels.cu.cc).
// No TensorFlow or CUDA header here: the g++-compiled op kernels call these with the stream of the
// op's GPU device passed as void*.
#ifndef KERASDET_DEFORM_CONV_DEFORM_CONV_GPU_H_
#define KERASDET_DEFORM_CONV_DEFORM_CONV_GPU_H_

#include <stdint.h>

#include "deform_conv/deform_conv_core.h"

namespace kerasdet {
namespace deform_conv {

// Each returns false (and the caller reports an error) when a launch fails.

// columns [rows, K * C] of output rows [row0, row0 + rows).
bool LaunchIm2Col(const Geometry& geo, const float* input, const float* offset, const float* mask,
                  int64_t row0, int64_t rows, float* columns, void* stream);

// c[m, n] (+)= sum_k op(a)[m, k] * op(b)[k, n], row-major; op(a) = a^T when trans_a (a is [k, m]),
// op(b) = b^T when trans_b (b is [n, k]).
bool LaunchGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                const float* b, float* c, bool accumulate, void* stream);

// From grad_columns [rows, K * C]: grad_offset and grad_mask of rows [row0, row0 + rows), and the
// input gradient scattered (atomically added) into grad_input, which the caller zeroes first.
bool LaunchCol2ImAndCoordinateGrad(const Geometry& geo, const float* input, const float* offset,
                                   const float* mask, const float* grad_columns, int64_t row0,
                                   int64_t rows, float* grad_input, float* grad_offset,
                                   float* grad_mask, void* stream);

bool LaunchZero(float* data, int64_t count, void* stream);

}  // namespace deform_conv
}  // namespace kerasdet

#endif  // KERASDET_DEFORM_CONV_DEFORM_CONV_GPU_H_
