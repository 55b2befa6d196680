// Geometry of the integer-bin RoI family: RoIPool (Fast R-CNN, max) and PSRoIPool (R-FCN, average).
//
// Shared by the CPU and CUDA kernels (no TensorFlow header, see common/bilinear.h). Three bin rules
// (kerasdet/ops/roi.py's docstring has the full definitions):
//   * kFastRCNN (roi_pool): corners scaled then rounded half away from zero; the RoI spans
//     max(end - start + 1, 1) pixels (inclusive end); bin k covers
//     [floor(k * size) + start, ceil((k + 1) * size) + start) clipped to [0, map size].
//   * kRFCN (ps_roi_pool's default, R-FCN's Caffe layer): corners rounded in image pixels, then
//     scaled, the end one image pixel further (inclusive end); the RoI is at least 0.1 feature
//     pixels; bin k covers [floor(start + k * size), ceil(start + (k + 1) * size)) clipped to
//     [0, map size].
//   * kTorchvision (torchvision.ops.ps_roi_pool): corners scaled then rounded; the RoI spans
//     max(end - start, 1) pixels (no inclusive end); bins as kFastRCNN, but clipped to
//     [0, map size - 1] as torchvision's forward pass does (its last row and column never count).
#ifndef KERASDET_ROI_POOL_CORE_H_
#define KERASDET_ROI_POOL_CORE_H_

#include "common/bilinear.h"

namespace kerasdet {

enum BinRule : int { kFastRCNN = 0, kRFCN = 1, kTorchvision = 2 };

struct RoIPoolParams {
  int batch, height, width, channels;  // input features [B, H, W, C]
  int num_rois, pooled_h, pooled_w;
  int out_channels;                    // C, or C / (ph * pw) when position sensitive
  float spatial_scale;
  bool position_sensitive;
  int bin_rule;                        // a BinRule
};

struct PixelBin {
  int h0, h1, w0, w1;  // [h0, h1) x [w0, w1), possibly empty
};

KD_HOST_DEVICE int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Fast R-CNN: bin k of `parts` along one axis of a RoI [lo, hi] (image pixels), clipped to
// [0, size].
KD_HOST_DEVICE void integer_bin(float lo, float hi, float scale, int parts, int k, int size,
                                int* first, int* last) {
  const float start = round_half_away(lo * scale);
  const float end = round_half_away(hi * scale);
  const float length = fmaxf(end - start + 1.f, 1.f);
  const float bin = length / static_cast<float>(parts);
  // Clip in float first: huge coordinates must not overflow the int conversion.
  const float f = fminf(fmaxf(floorf(static_cast<float>(k) * bin) + start, 0.f),
                        static_cast<float>(size));
  const float l = fminf(fmaxf(ceilf(static_cast<float>(k + 1) * bin) + start, 0.f),
                        static_cast<float>(size));
  *first = static_cast<int>(f);
  *last = static_cast<int>(l);
}

// The float product a * b rounded on its own. nvcc would otherwise fuse `a * b + c` into one
// fused multiply-add (one rounding), and the bin edges of the R-FCN rule would then differ from
// the CPU kernel and the fallback by a pixel where start + k * size lands next to an integer. (The
// CPU code is compiled for baseline x86-64, which has no FMA instruction to fuse into.)
KD_HOST_DEVICE float product_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Clip a float bin edge to [0, limit] before the int conversion (huge coordinates must not
// overflow it).
KD_HOST_DEVICE int clipped_edge(float v, int limit) {
  return static_cast<int>(fminf(fmaxf(v, 0.f), static_cast<float>(limit)));
}

// R-FCN: bin k of `parts` along one axis of a RoI [lo, hi] (image pixels), clipped to [0, size].
// roundf is C's round (half away from zero), as Caffe's round() of a float.
KD_HOST_DEVICE void rfcn_bin(float lo, float hi, float scale, int parts, int k, int size,
                             int* first, int* last) {
  const float start = product_rn(roundf(lo), scale);
  const float end = product_rn(roundf(hi) + 1.f, scale);
  const float length = fmaxf(end - start, 0.1f);
  const float bin = length / static_cast<float>(parts);
  *first = clipped_edge(floorf(product_rn(static_cast<float>(k), bin) + start), size);
  *last = clipped_edge(ceilf(product_rn(static_cast<float>(k + 1), bin) + start), size);
}

// torchvision: the same along one axis; clipped to [0, size - 1] like torchvision's forward pass.
KD_HOST_DEVICE void torchvision_bin(float lo, float hi, float scale, int parts, int k, int size,
                                    int* first, int* last) {
  const float start = roundf(product_rn(lo, scale));
  const float end = roundf(product_rn(hi, scale));
  const float length = fmaxf(end - start, 1.f);
  const float bin = length / static_cast<float>(parts);
  const int limit = size > 0 ? size - 1 : 0;
  *first = clipped_edge(floorf(product_rn(static_cast<float>(k), bin)) + start, limit);
  *last = clipped_edge(ceilf(product_rn(static_cast<float>(k + 1), bin)) + start, limit);
}

KD_HOST_DEVICE void rule_bin(const RoIPoolParams& p, float lo, float hi, int parts, int k,
                             int size, int* first, int* last) {
  if (p.bin_rule == kRFCN) {
    rfcn_bin(lo, hi, p.spatial_scale, parts, k, size, first, last);
  } else if (p.bin_rule == kTorchvision) {
    torchvision_bin(lo, hi, p.spatial_scale, parts, k, size, first, last);
  } else {
    integer_bin(lo, hi, p.spatial_scale, parts, k, size, first, last);
  }
}

KD_HOST_DEVICE PixelBin roi_pool_bin(const float* box, const RoIPoolParams& p, int i, int j) {
  PixelBin b;
  rule_bin(p, box[1], box[3], p.pooled_h, i, p.height, &b.h0, &b.h1);
  rule_bin(p, box[0], box[2], p.pooled_w, j, p.width, &b.w0, &b.w1);
  return b;
}

// Raw-pointer CUDA launchers (roi_pool_gpu.cu.cc); return a CUDA error code (0 = success).
int LaunchRoIPoolForwardGPU(const RoIPoolParams& p, const float* features, const float* boxes,
                            const int* box_indices, float* output, int* argmax, void* stream);
int LaunchRoIPoolBackwardGPU(const RoIPoolParams& p, const float* grad, const float* boxes,
                             const int* box_indices, const int* argmax, float* grad_features,
                             void* stream);

}  // namespace kerasdet

#endif  // KERASDET_ROI_POOL_CORE_H_
