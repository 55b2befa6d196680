// Geometry of the bilinear RoI family: RoIAlign, PSRoIAlign, DeformRoIPool and DeformPSRoIPool.
//
// All four are one computation with two switches, so they share one definition here (used by the
// CPU kernels and by the CUDA kernels; no TensorFlow header, see common/bilinear.h):
//   * position_sensitive: output channel c of bin (i, j) reads input channel (c * ph + i) * pw + j
//     (R-FCN), else channel c;
//   * offset_groups > 0: bin (i, j) of output channels of group g is shifted by
//     (gamma * roi_w * offsets[r, i, j, 2g], gamma * roi_h * offsets[r, i, j, 2g + 1]) feature
//     pixels (Deformable ConvNets: Δp = γ · Δp̂ ∘ (w, h), offsets stored as (dx, dy)).
// The bins and samples are those of Mask R-CNN's RoIAlign (Detectron2 ROIAlign semantics).
#ifndef KERASDET_ROI_ALIGN_CORE_H_
#define KERASDET_ROI_ALIGN_CORE_H_

#include "common/bilinear.h"

namespace kerasdet {

struct RoIAlignParams {
  int batch, height, width, channels;  // input features [B, H, W, C]
  int num_rois, pooled_h, pooled_w;
  int out_channels;                    // C, or C / (ph * pw) when position sensitive
  float spatial_scale;
  int sampling_ratio;                  // <= 0: ceil(bin size) samples per bin and axis
  bool aligned;                        // shift the RoI by -0.5 pixel (continuous coordinates)
  bool position_sensitive;
  int offset_groups;                   // 0: no offsets; G: offsets [R, ph, pw, 2 * G]
  float gamma;
};

struct RoIAlignGeometry {
  float start_y, start_x;  // top-left corner in feature pixels
  float roi_h, roi_w;
  float bin_h, bin_w;
  int grid_h, grid_w;      // samples per bin along each axis
  float inv_count;         // 1 / max(grid_h * grid_w, 1)
};

KD_HOST_DEVICE RoIAlignGeometry roi_align_geometry(const float* box, const RoIAlignParams& p) {
  RoIAlignGeometry g;
  const float shift = p.aligned ? 0.5f : 0.f;
  const float x1 = box[0] * p.spatial_scale - shift, y1 = box[1] * p.spatial_scale - shift;
  const float x2 = box[2] * p.spatial_scale - shift, y2 = box[3] * p.spatial_scale - shift;
  float roi_w = x2 - x1, roi_h = y2 - y1;
  if (!p.aligned) {  // legacy RoIAlign: RoIs at least one pixel wide
    roi_w = fmaxf(roi_w, 1.f);
    roi_h = fmaxf(roi_h, 1.f);
  }
  g.start_y = y1;
  g.start_x = x1;
  g.roi_h = roi_h;
  g.roi_w = roi_w;
  g.bin_h = roi_h / static_cast<float>(p.pooled_h);
  g.bin_w = roi_w / static_cast<float>(p.pooled_w);
  if (p.sampling_ratio > 0) {
    g.grid_h = g.grid_w = p.sampling_ratio;
  } else {  // an empty (or inverted) RoI gets no sample and pools to 0
    g.grid_h = static_cast<int>(fmaxf(ceilf(g.bin_h), 0.f));
    g.grid_w = static_cast<int>(fmaxf(ceilf(g.bin_w), 0.f));
  }
  const int count = g.grid_h * g.grid_w;
  g.inv_count = 1.f / static_cast<float>(count > 1 ? count : 1);
  return g;
}

// Sample iy (of grid_h) of bin row i, before any deformable shift.
KD_HOST_DEVICE float sample_y(const RoIAlignGeometry& g, int i, int iy) {
  return g.start_y + static_cast<float>(i) * g.bin_h +
         (static_cast<float>(iy) + 0.5f) * g.bin_h / static_cast<float>(g.grid_h);
}

KD_HOST_DEVICE float sample_x(const RoIAlignGeometry& g, int j, int ix) {
  return g.start_x + static_cast<float>(j) * g.bin_w +
         (static_cast<float>(ix) + 0.5f) * g.bin_w / static_cast<float>(g.grid_w);
}

// Offset into the channel axis of the first input channel that output channel 0 of bin (i, j)
// reads, and the stride between consecutive output channels.
KD_HOST_DEVICE int channel_base(const RoIAlignParams& p, int i, int j) {
  return p.position_sensitive ? i * p.pooled_w + j : 0;
}

KD_HOST_DEVICE int channel_stride(const RoIAlignParams& p) {
  return p.position_sensitive ? p.pooled_h * p.pooled_w : 1;
}

// Raw-pointer CUDA launchers (roi_align_gpu.cu.cc); return a CUDA error code (0 = success).
int LaunchRoIAlignForwardGPU(const RoIAlignParams& p, const float* features, const float* boxes,
                             const int* box_indices, const float* offsets, float* output,
                             void* stream);
int LaunchRoIAlignBackwardGPU(const RoIAlignParams& p, const float* grad, const float* features,
                              const float* boxes, const int* box_indices, const float* offsets,
                              float* grad_features, float* grad_offsets, void* stream);

}  // namespace kerasdet

#endif  // KERASDET_ROI_ALIGN_CORE_H_
