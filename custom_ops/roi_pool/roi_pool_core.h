// Geometry of the integer-bin RoI family: RoIPool (Fast R-CNN, max) and PSRoIPool (R-FCN, average).
//
// Shared by the CPU and CUDA kernels (no TensorFlow header, see common/bilinear.h). Coordinates are
// scaled then rounded half away from zero; the RoI spans max(end - start + 1, 1) pixels (inclusive
// end); bin k covers [floor(k * size) + start, ceil((k + 1) * size) + start) clipped to the map.
#ifndef KERASDET_ROI_POOL_CORE_H_
#define KERASDET_ROI_POOL_CORE_H_

#include "common/bilinear.h"

namespace kerasdet {

struct RoIPoolParams {
  int batch, height, width, channels;  // input features [B, H, W, C]
  int num_rois, pooled_h, pooled_w;
  int out_channels;                    // C, or C / (ph * pw) when position sensitive
  float spatial_scale;
  bool position_sensitive;
};

struct PixelBin {
  int h0, h1, w0, w1;  // [h0, h1) x [w0, w1), possibly empty
};

KD_HOST_DEVICE int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Bin k of `parts` along one axis of a RoI [lo, hi] (image pixels), clipped to [0, size].
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

KD_HOST_DEVICE PixelBin roi_pool_bin(const float* box, const RoIPoolParams& p, int i, int j) {
  PixelBin b;
  integer_bin(box[1], box[3], p.spatial_scale, p.pooled_h, i, p.height, &b.h0, &b.h1);
  integer_bin(box[0], box[2], p.spatial_scale, p.pooled_w, j, p.width, &b.w0, &b.w1);
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
