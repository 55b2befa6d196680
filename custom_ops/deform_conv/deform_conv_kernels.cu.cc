// CUDA kernels of the deformable convolution (launchers declared in deform_conv_gpu.h).
//
// Same algorithm as the CPU kernels: deformable im2col, a matrix product, and for the backward
// pass the sampling-position derivative (grad_offset / grad_mask) and a col2im scatter (atomicAdd:
// different output positions may sample the same input pixel). Threads run over channels fastest,
// so reads and writes of the NHWC tensors and of the tap-major columns are coalesced.
#if GOOGLE_CUDA

#include <cuda_runtime.h>

#include <algorithm>

#include "deform_conv/deform_conv_gpu.h"

namespace kerasdet {
namespace deform_conv {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 16;

inline unsigned int Blocks(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 1 << 30));
}

#define KD_GRID_STRIDE(index, total)                                                   \
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;   \
       index < (total); index += static_cast<int64_t>(blockDim.x) * gridDim.x)

// One thread per (row, group, tap, channel of the group).
__global__ void Im2ColKernel(Geometry geo, const float* __restrict__ input,
                             const float* __restrict__ offset, const float* __restrict__ mask,
                             int64_t row0, int64_t rows, float* __restrict__ columns) {
  const int cg = geo.group_channels(), K = geo.taps(), C = geo.channels;
  const int64_t total = rows * geo.groups * K * cg;
  const int64_t image = static_cast<int64_t>(geo.height) * geo.width * C;
  KD_GRID_STRIDE(index, total) {
    const int ch = static_cast<int>(index % cg);
    int64_t rest = index / cg;
    const int t = static_cast<int>(rest % K);
    rest /= K;
    const int g = static_cast<int>(rest % geo.groups);
    const int64_t r = rest / geo.groups;
    const int64_t row = row0 + r;
    float m;
    const BilinearTap tap = sample_tap(geo, offset, mask, row, g, t, &m);
    const float* img = input + (row / geo.positions()) * image + g * cg + ch;
    const float value =
        tap.w00 * img[(static_cast<int64_t>(tap.y0) * geo.width + tap.x0) * C] +
        tap.w01 * img[(static_cast<int64_t>(tap.y0) * geo.width + tap.x1) * C] +
        tap.w10 * img[(static_cast<int64_t>(tap.y1) * geo.width + tap.x0) * C] +
        tap.w11 * img[(static_cast<int64_t>(tap.y1) * geo.width + tap.x1) * C];
    columns[r * K * C + static_cast<int64_t>(t) * C + g * cg + ch] = m * value;
  }
}

// Shared-memory tiled product; row tiles on grid x (no 65535 limit), column tiles on grid y.
__global__ void GemmKernel(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                           const float* __restrict__ a, const float* __restrict__ b,
                           float* __restrict__ c, bool accumulate) {
  __shared__ float a_tile[kTile][kTile + 1];
  __shared__ float b_tile[kTile][kTile + 1];
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTile + ty;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTile + tx;
  float sum = 0.f;
  for (int64_t p0 = 0; p0 < k; p0 += kTile) {
    const int64_t ap = p0 + tx, bp = p0 + ty;
    a_tile[ty][tx] = (row < m && ap < k) ? (trans_a ? a[ap * m + row] : a[row * k + ap]) : 0.f;
    b_tile[ty][tx] = (bp < k && col < n) ? (trans_b ? b[col * k + bp] : b[bp * n + col]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kTile; ++q) sum += a_tile[ty][q] * b_tile[q][tx];
    __syncthreads();
  }
  if (row < m && col < n) c[row * n + col] = accumulate ? c[row * n + col] + sum : sum;
}

// One thread per (row, group, tap): grad_offset (dy, dx) and grad_mask, summing over channels.
__global__ void CoordinateGradKernel(Geometry geo, const float* __restrict__ input,
                                     const float* __restrict__ offset,
                                     const float* __restrict__ mask,
                                     const float* __restrict__ grad_columns, int64_t row0,
                                     int64_t rows, float* __restrict__ grad_offset,
                                     float* __restrict__ grad_mask) {
  const int cg = geo.group_channels(), K = geo.taps(), C = geo.channels;
  const int64_t total = rows * geo.groups * K;
  const int64_t image = static_cast<int64_t>(geo.height) * geo.width * C;
  KD_GRID_STRIDE(index, total) {
    const int t = static_cast<int>(index % K);
    const int g = static_cast<int>((index / K) % geo.groups);
    const int64_t r = index / (static_cast<int64_t>(K) * geo.groups);
    const int64_t row = row0 + r;
    float m;
    const BilinearTap tap = sample_tap(geo, offset, mask, row, g, t, &m);
    const float* img = input + (row / geo.positions()) * image + g * cg;
    const float* a = img + (static_cast<int64_t>(tap.y0) * geo.width + tap.x0) * C;
    const float* b = img + (static_cast<int64_t>(tap.y0) * geo.width + tap.x1) * C;
    const float* c = img + (static_cast<int64_t>(tap.y1) * geo.width + tap.x0) * C;
    const float* d = img + (static_cast<int64_t>(tap.y1) * geo.width + tap.x1) * C;
    const float* gc = grad_columns + r * K * C + static_cast<int64_t>(t) * C + g * cg;
    float value = 0.f, dy = 0.f, dx = 0.f;
    for (int ch = 0; ch < cg; ++ch) {
      const float va = a[ch], vb = b[ch], vc = c[ch], vd = d[ch], grad = gc[ch];
      value += grad * (tap.w00 * va + tap.w01 * vb + tap.w10 * vc + tap.w11 * vd);
      dy += grad * (tap.dy00 * va + tap.dy01 * vb + tap.dy10 * vc + tap.dy11 * vd);
      dx += grad * (tap.dx00 * va + tap.dx01 * vb + tap.dx10 * vc + tap.dx11 * vd);
    }
    const int64_t k = static_cast<int64_t>(g) * K + t;
    grad_offset[row * 2 * geo.groups * K + 2 * k] = m * dy;
    grad_offset[row * 2 * geo.groups * K + 2 * k + 1] = m * dx;
    if (geo.has_mask) grad_mask[row * geo.groups * K + k] = value;
  }
}

// One thread per (row, group, tap, channel): scatter into the four corners.
__global__ void Col2ImKernel(Geometry geo, const float* __restrict__ offset,
                             const float* __restrict__ mask,
                             const float* __restrict__ grad_columns, int64_t row0, int64_t rows,
                             float* __restrict__ grad_input) {
  const int cg = geo.group_channels(), K = geo.taps(), C = geo.channels;
  const int64_t total = rows * geo.groups * K * cg;
  const int64_t image = static_cast<int64_t>(geo.height) * geo.width * C;
  KD_GRID_STRIDE(index, total) {
    const int ch = static_cast<int>(index % cg);
    int64_t rest = index / cg;
    const int t = static_cast<int>(rest % K);
    rest /= K;
    const int g = static_cast<int>(rest % geo.groups);
    const int64_t r = rest / geo.groups;
    const int64_t row = row0 + r;
    float m;
    const BilinearTap tap = sample_tap(geo, offset, mask, row, g, t, &m);
    const float grad = m * grad_columns[r * K * C + static_cast<int64_t>(t) * C + g * cg + ch];
    float* img = grad_input + (row / geo.positions()) * image + g * cg + ch;
    if (tap.w00 != 0.f) atomicAdd(img + (static_cast<int64_t>(tap.y0) * geo.width + tap.x0) * C, tap.w00 * grad);
    if (tap.w01 != 0.f) atomicAdd(img + (static_cast<int64_t>(tap.y0) * geo.width + tap.x1) * C, tap.w01 * grad);
    if (tap.w10 != 0.f) atomicAdd(img + (static_cast<int64_t>(tap.y1) * geo.width + tap.x0) * C, tap.w10 * grad);
    if (tap.w11 != 0.f) atomicAdd(img + (static_cast<int64_t>(tap.y1) * geo.width + tap.x1) * C, tap.w11 * grad);
  }
}

#undef KD_GRID_STRIDE

bool LaunchOk() { return cudaGetLastError() == cudaSuccess; }

}  // namespace

bool LaunchIm2Col(const Geometry& geo, const float* input, const float* offset, const float* mask,
                  int64_t row0, int64_t rows, float* columns, void* stream) {
  const int64_t total = rows * geo.groups * geo.taps() * geo.group_channels();
  if (total == 0) return true;
  Im2ColKernel<<<Blocks(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      geo, input, offset, mask, row0, rows, columns);
  return LaunchOk();
}

bool LaunchGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                const float* b, float* c, bool accumulate, void* stream) {
  if (m == 0 || n == 0) return true;
  const dim3 block(kTile, kTile);
  const dim3 grid(static_cast<unsigned int>((m + kTile - 1) / kTile),
                  static_cast<unsigned int>((n + kTile - 1) / kTile));
  GemmKernel<<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(trans_a, trans_b, m, n, k, a,
                                                                      b, c, accumulate);
  return LaunchOk();
}

bool LaunchCol2ImAndCoordinateGrad(const Geometry& geo, const float* input, const float* offset,
                                   const float* mask, const float* grad_columns, int64_t row0,
                                   int64_t rows, float* grad_input, float* grad_offset,
                                   float* grad_mask, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t taps = rows * geo.groups * geo.taps();
  if (taps == 0) return true;
  CoordinateGradKernel<<<Blocks(taps), kThreads, 0, s>>>(geo, input, offset, mask, grad_columns,
                                                         row0, rows, grad_offset, grad_mask);
  if (!LaunchOk()) return false;
  const int64_t total = taps * geo.group_channels();
  if (total == 0) return true;
  Col2ImKernel<<<Blocks(total), kThreads, 0, s>>>(geo, offset, mask, grad_columns, row0, rows,
                                                  grad_input);
  return LaunchOk();
}

bool LaunchZero(float* data, int64_t count, void* stream) {
  return cudaMemsetAsync(data, 0, sizeof(float) * count, static_cast<cudaStream_t>(stream)) ==
         cudaSuccess;
}

}  // namespace deform_conv
}  // namespace kerasdet

#endif  // GOOGLE_CUDA
