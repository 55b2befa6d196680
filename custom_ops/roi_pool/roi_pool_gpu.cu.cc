// CUDA kernels of RoIPool (max + arg-max) and PSRoIPool (average) and their gradients.
//
// Compiled by nvcc without TensorFlow headers; called from roi_pool_gpu_ops.cc on TensorFlow's
// stream. One thread per output element; gradients scatter with atomicAdd. A box whose batch
// index is out of range pools to 0 here (the CPU kernel reports it as an error).
#include <cfloat>

#include <cuda_runtime.h>

#include "roi_pool/roi_pool_core.h"

namespace kerasdet {
namespace {

constexpr int kThreads = 256;

inline int Blocks(long long n) {
  long long b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535LL * 32 ? b : 65535LL * 32);
}

__global__ void ForwardKernel(RoIPoolParams p, const float* features, const float* boxes,
                              const int* box_indices, float* output, int* argmax,
                              long long total) {
  const int bins = p.pooled_h * p.pooled_w;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)blockDim.x * gridDim.x) {
    const int c = static_cast<int>(e % p.out_channels);
    const long long u = e / p.out_channels;
    const int j = static_cast<int>(u % p.pooled_w);
    const int i = static_cast<int>((u / p.pooled_w) % p.pooled_h);
    const int r = static_cast<int>(u / bins);
    const int b = box_indices[r];
    const PixelBin bin = roi_pool_bin(boxes + 4 * r, p, i, j);
    const bool empty = b < 0 || b >= p.batch || bin.h1 <= bin.h0 || bin.w1 <= bin.w0;
    if (empty) {
      output[e] = 0.f;
      if (argmax != nullptr) argmax[e] = -1;
      continue;
    }
    const int ch = p.position_sensitive ? c * bins + i * p.pooled_w + j : c;
    const float* img = features + (long long)b * p.height * p.width * p.channels + ch;
    float best = -FLT_MAX, sum = 0.f;
    int best_at = -1;
    for (int h = bin.h0; h < bin.h1; ++h) {
      for (int w = bin.w0; w < bin.w1; ++w) {
        const int pixel = h * p.width + w;
        const float v = img[(long long)pixel * p.channels];
        sum += v;
        if (v > best || best_at < 0) {
          best = v;
          best_at = pixel;
        }
      }
    }
    if (p.position_sensitive) {
      output[e] = sum / static_cast<float>((bin.h1 - bin.h0) * (bin.w1 - bin.w0));
    } else {
      output[e] = best;
      argmax[e] = best_at;
    }
  }
}

__global__ void MaxBackwardKernel(RoIPoolParams p, const float* grad, const int* box_indices,
                                  const int* argmax, float* grad_features, long long total) {
  const int bins = p.pooled_h * p.pooled_w;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)blockDim.x * gridDim.x) {
    const int c = static_cast<int>(e % p.channels);
    const int r = static_cast<int>(e / p.channels / bins);
    const int b = box_indices[r];
    const int at = argmax[e];
    if (at < 0 || b < 0 || b >= p.batch || at >= p.height * p.width) continue;
    atomicAdd(grad_features + ((long long)b * p.height * p.width + at) * p.channels + c, grad[e]);
  }
}

__global__ void AverageBackwardKernel(RoIPoolParams p, const float* grad, const float* boxes,
                                      const int* box_indices, float* grad_features,
                                      long long total) {
  const int bins = p.pooled_h * p.pooled_w;
  for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
       e += (long long)blockDim.x * gridDim.x) {
    const int c = static_cast<int>(e % p.out_channels);
    const long long u = e / p.out_channels;
    const int j = static_cast<int>(u % p.pooled_w);
    const int i = static_cast<int>((u / p.pooled_w) % p.pooled_h);
    const int r = static_cast<int>(u / bins);
    const int b = box_indices[r];
    const PixelBin bin = roi_pool_bin(boxes + 4 * r, p, i, j);
    if (b < 0 || b >= p.batch || bin.h1 <= bin.h0 || bin.w1 <= bin.w0) continue;
    const float gv = grad[e] / static_cast<float>((bin.h1 - bin.h0) * (bin.w1 - bin.w0));
    float* img = grad_features + (long long)b * p.height * p.width * p.channels + c * bins +
                 i * p.pooled_w + j;
    for (int h = bin.h0; h < bin.h1; ++h) {
      for (int w = bin.w0; w < bin.w1; ++w) {
        atomicAdd(img + ((long long)h * p.width + w) * p.channels, gv);
      }
    }
  }
}

}  // namespace

int LaunchRoIPoolForwardGPU(const RoIPoolParams& p, const float* features, const float* boxes,
                            const int* box_indices, float* output, int* argmax, void* stream) {
  const long long total = (long long)p.num_rois * p.pooled_h * p.pooled_w * p.out_channels;
  if (total == 0) return 0;
  ForwardKernel<<<Blocks(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      p, features, boxes, box_indices, output, argmax, total);
  return static_cast<int>(cudaGetLastError());
}

int LaunchRoIPoolBackwardGPU(const RoIPoolParams& p, const float* grad, const float* boxes,
                             const int* box_indices, const int* argmax, float* grad_features,
                             void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const long long feature_size = (long long)p.batch * p.height * p.width * p.channels;
  cudaError_t err = cudaMemsetAsync(grad_features, 0, feature_size * sizeof(float), s);
  if (err != cudaSuccess) return static_cast<int>(err);
  const long long total = (long long)p.num_rois * p.pooled_h * p.pooled_w * p.out_channels;
  if (total == 0 || feature_size == 0) return 0;
  if (p.position_sensitive) {
    AverageBackwardKernel<<<Blocks(total), kThreads, 0, s>>>(p, grad, boxes, box_indices,
                                                             grad_features, total);
  } else {
    MaxBackwardKernel<<<Blocks(total), kThreads, 0, s>>>(p, grad, box_indices, argmax,
                                                         grad_features, total);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace kerasdet
