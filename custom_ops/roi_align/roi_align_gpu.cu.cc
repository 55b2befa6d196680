// CUDA kernels of the bilinear RoI family (RoIAlign, PSRoIAlign, DeformRoIPool, DeformPSRoIPool).
//
// Compiled by nvcc without TensorFlow headers (they do not compile under nvcc); the OpKernels in
// roi_align_gpu_ops.cc call these raw-pointer launchers on TensorFlow's CUDA stream. One thread
// per output element; the feature gradient scatters with atomicAdd. A box whose batch index is out
// of range pools to 0 here (the index lives in device memory; the CPU kernel reports it).
#include <cuda_runtime.h>

#include "roi_align/roi_align_core.h"

namespace kerasdet {
namespace {

constexpr int kThreads = 256;

inline int Blocks(long long n) {
  long long b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535LL * 32 ? b : 65535LL * 32);
}

__device__ __forceinline__ void BinShift(const RoIAlignParams& p, const RoIAlignGeometry& g,
                                         const float* offsets, long long u, int grp, float* dy,
                                         float* dx) {
  *dy = *dx = 0.f;
  if (p.offset_groups > 0) {
    const float* t = offsets + u * 2 * p.offset_groups + 2 * grp;
    *dx = p.gamma * t[0] * g.roi_w;
    *dy = p.gamma * t[1] * g.roi_h;
  }
}

__global__ void ForwardKernel(RoIAlignParams p, const float* features, const float* boxes,
                              const int* box_indices, const float* offsets, float* output,
                              long long total) {
  const int groups = p.offset_groups > 0 ? p.offset_groups : 1;
  const int cpg = p.out_channels / groups;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)blockDim.x * gridDim.x) {
    const int c = static_cast<int>(e % p.out_channels);
    const long long u = e / p.out_channels;
    const int j = static_cast<int>(u % p.pooled_w);
    const int i = static_cast<int>((u / p.pooled_w) % p.pooled_h);
    const int r = static_cast<int>(u / (p.pooled_w * p.pooled_h));
    const int b = box_indices[r];
    if (b < 0 || b >= p.batch) {
      output[e] = 0.f;
      continue;
    }
    const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
    float dy, dx;
    BinShift(p, g, offsets, u, c / cpg, &dy, &dx);
    const int ch = channel_base(p, i, j) + c * channel_stride(p);
    const float* img = features + (long long)b * p.height * p.width * p.channels + ch;
    float acc = 0.f;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const float y = sample_y(g, i, iy) + dy;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const float x = sample_x(g, j, ix) + dx;
        const BilinearTap t = roi_align_tap(y, x, p.height, p.width);
        acc += t.w00 * img[((long long)t.y0 * p.width + t.x0) * p.channels] +
               t.w01 * img[((long long)t.y0 * p.width + t.x1) * p.channels] +
               t.w10 * img[((long long)t.y1 * p.width + t.x0) * p.channels] +
               t.w11 * img[((long long)t.y1 * p.width + t.x1) * p.channels];
      }
    }
    output[e] = acc * g.inv_count;
  }
}

__global__ void BackwardFeaturesKernel(RoIAlignParams p, const float* grad, const float* boxes,
                                       const int* box_indices, const float* offsets,
                                       float* grad_features, long long total) {
  const int groups = p.offset_groups > 0 ? p.offset_groups : 1;
  const int cpg = p.out_channels / groups;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)blockDim.x * gridDim.x) {
    const int c = static_cast<int>(e % p.out_channels);
    const long long u = e / p.out_channels;
    const int j = static_cast<int>(u % p.pooled_w);
    const int i = static_cast<int>((u / p.pooled_w) % p.pooled_h);
    const int r = static_cast<int>(u / (p.pooled_w * p.pooled_h));
    const int b = box_indices[r];
    if (b < 0 || b >= p.batch) continue;
    const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
    float dy, dx;
    BinShift(p, g, offsets, u, c / cpg, &dy, &dx);
    const int ch = channel_base(p, i, j) + c * channel_stride(p);
    float* img = grad_features + (long long)b * p.height * p.width * p.channels + ch;
    const float gv = grad[e] * g.inv_count;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const float y = sample_y(g, i, iy) + dy;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const float x = sample_x(g, j, ix) + dx;
        const BilinearTap t = roi_align_tap(y, x, p.height, p.width);
        if (t.w00 + t.w01 + t.w10 + t.w11 == 0.f) continue;
        atomicAdd(img + ((long long)t.y0 * p.width + t.x0) * p.channels, t.w00 * gv);
        atomicAdd(img + ((long long)t.y0 * p.width + t.x1) * p.channels, t.w01 * gv);
        atomicAdd(img + ((long long)t.y1 * p.width + t.x0) * p.channels, t.w10 * gv);
        atomicAdd(img + ((long long)t.y1 * p.width + t.x1) * p.channels, t.w11 * gv);
      }
    }
  }
}

// One thread per (RoI, bin, group): the offset gradient is a reduction over samples and channels.
__global__ void BackwardOffsetsKernel(RoIAlignParams p, const float* grad, const float* features,
                                      const float* boxes, const int* box_indices,
                                      const float* offsets, float* grad_offsets, long long total) {
  const int groups = p.offset_groups;
  const int cpg = p.out_channels / groups;
  const int cs = channel_stride(p);
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)blockDim.x * gridDim.x) {
    const int grp = static_cast<int>(e % groups);
    const long long u = e / groups;
    const int j = static_cast<int>(u % p.pooled_w);
    const int i = static_cast<int>((u / p.pooled_w) % p.pooled_h);
    const int r = static_cast<int>(u / (p.pooled_w * p.pooled_h));
    const int b = box_indices[r];
    float* go = grad_offsets + u * 2 * groups + 2 * grp;
    if (b < 0 || b >= p.batch) {
      go[0] = go[1] = 0.f;
      continue;
    }
    const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
    float dy, dx;
    BinShift(p, g, offsets, u, grp, &dy, &dx);
    const float* img = features + (long long)b * p.height * p.width * p.channels +
                       channel_base(p, i, j) + (long long)grp * cpg * cs;
    const float* gb = grad + u * p.out_channels + grp * cpg;
    float sum_y = 0.f, sum_x = 0.f;
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const float y = sample_y(g, i, iy) + dy;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const float x = sample_x(g, j, ix) + dx;
        const BilinearTap t = roi_align_tap(y, x, p.height, p.width);
        const float* p00 = img + ((long long)t.y0 * p.width + t.x0) * p.channels;
        const float* p01 = img + ((long long)t.y0 * p.width + t.x1) * p.channels;
        const float* p10 = img + ((long long)t.y1 * p.width + t.x0) * p.channels;
        const float* p11 = img + ((long long)t.y1 * p.width + t.x1) * p.channels;
        for (int c = 0; c < cpg; ++c) {
          const float v00 = p00[c * cs], v01 = p01[c * cs], v10 = p10[c * cs], v11 = p11[c * cs];
          sum_y += gb[c] * (t.dy00 * v00 + t.dy01 * v01 + t.dy10 * v10 + t.dy11 * v11);
          sum_x += gb[c] * (t.dx00 * v00 + t.dx01 * v01 + t.dx10 * v10 + t.dx11 * v11);
        }
      }
    }
    go[0] = sum_x * g.inv_count * p.gamma * g.roi_w;
    go[1] = sum_y * g.inv_count * p.gamma * g.roi_h;
  }
}

}  // namespace

int LaunchRoIAlignForwardGPU(const RoIAlignParams& p, const float* features, const float* boxes,
                             const int* box_indices, const float* offsets, float* output,
                             void* stream) {
  const long long total = (long long)p.num_rois * p.pooled_h * p.pooled_w * p.out_channels;
  if (total == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if ((long long)p.batch * p.height * p.width * p.channels == 0) {  // nothing to sample from
    return static_cast<int>(cudaMemsetAsync(output, 0, total * sizeof(float), s));
  }
  ForwardKernel<<<Blocks(total), kThreads, 0, s>>>(p, features, boxes, box_indices, offsets,
                                                   output, total);
  return static_cast<int>(cudaGetLastError());
}

int LaunchRoIAlignBackwardGPU(const RoIAlignParams& p, const float* grad, const float* features,
                              const float* boxes, const int* box_indices, const float* offsets,
                              float* grad_features, float* grad_offsets, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const long long feature_size = (long long)p.batch * p.height * p.width * p.channels;
  cudaError_t err = cudaMemsetAsync(grad_features, 0, feature_size * sizeof(float), s);
  if (err != cudaSuccess) return static_cast<int>(err);
  const long long bins = (long long)p.num_rois * p.pooled_h * p.pooled_w;
  if (bins == 0 || feature_size == 0) {
    if (grad_offsets != nullptr && bins > 0) {
      err = cudaMemsetAsync(grad_offsets, 0, bins * 2 * p.offset_groups * sizeof(float), s);
    }
    return static_cast<int>(err);
  }
  const long long total = bins * p.out_channels;
  BackwardFeaturesKernel<<<Blocks(total), kThreads, 0, s>>>(p, grad, boxes, box_indices, offsets,
                                                            grad_features, total);
  if (p.offset_groups > 0 && grad_offsets != nullptr) {
    const long long units = bins * p.offset_groups;
    BackwardOffsetsKernel<<<Blocks(units), kThreads, 0, s>>>(p, grad, features, boxes,
                                                             box_indices, offsets, grad_offsets,
                                                             units);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kerasdet
