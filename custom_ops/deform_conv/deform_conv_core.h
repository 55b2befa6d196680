// Deformable convolution (DCN v1 / v2), NHWC: the geometry and the per-sample math shared by the
// CPU kernels (g++) and the CUDA kernels (nvcc). No TensorFlow header here, so nvcc can compile it.
//
// For output position (i, j), deformable group g and kernel tap t = u * kw + v, the sample point is
//   y = i * stride_h - pad_h + u * dilation_h + offset[n, i, j, 2 * (g * K + t)]
//   x = j * stride_w - pad_w + v * dilation_w + offset[n, i, j, 2 * (g * K + t) + 1]
// (K = kh * kw), read from the channels [g * C / G, (g + 1) * C / G) of the input by bilinear
// interpolation where each grid point outside the map reads 0, and scaled by mask[n, i, j, g * K + t]
// (v2). The "columns" matrix has one row per output position and kh * kw * C columns, tap-major
// (column t * C + c), which is the row-major layout of a Keras kernel [kh, kw, C, C_out] seen as
// [K * C, C_out]: the convolution is then one matrix product, columns x kernel.
#ifndef KERASDET_DEFORM_CONV_DEFORM_CONV_CORE_H_
#define KERASDET_DEFORM_CONV_DEFORM_CONV_CORE_H_

#include <stdint.h>

#include "common/bilinear.h"

namespace kerasdet {
namespace deform_conv {

struct Geometry {
  int batch, height, width, channels;       // input [B, H, W, C]
  int out_height, out_width, out_channels;  // output [B, H_out, W_out, C_out]
  int kernel_h, kernel_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int groups;     // deformable groups; divides channels
  bool has_mask;  // DCN v2

  KD_HOST_DEVICE int taps() const { return kernel_h * kernel_w; }
  KD_HOST_DEVICE int group_channels() const { return channels / groups; }
  KD_HOST_DEVICE int positions() const { return out_height * out_width; }  // P, per image
  KD_HOST_DEVICE int64_t col_width() const { return static_cast<int64_t>(taps()) * channels; }
};

// The bilinear tap (corner indices and weights, mask folded into the weights) of sample (g, t) for
// output row `row` = n * P + i * W_out + j. `mask_value` receives the mask (1 without one).
KD_HOST_DEVICE BilinearTap sample_tap(const Geometry& geo, const float* offset, const float* mask,
                                      int64_t row, int g, int t, float* mask_value) {
  const int p = static_cast<int>(row % geo.positions());
  const int i = p / geo.out_width, j = p % geo.out_width;
  const int u = t / geo.kernel_w, v = t % geo.kernel_w;
  const int k = g * geo.taps() + t;
  const float* off = offset + row * 2 * geo.groups * geo.taps() + 2 * k;
  const float y = static_cast<float>(i * geo.stride_h - geo.pad_h + u * geo.dilation_h) + off[0];
  const float x = static_cast<float>(j * geo.stride_w - geo.pad_w + v * geo.dilation_w) + off[1];
  *mask_value = geo.has_mask ? mask[row * geo.groups * geo.taps() + k] : 1.f;
  return zero_padded_tap(y, x, geo.height, geo.width);
}

}  // namespace deform_conv
}  // namespace kerasdet

#endif  // KERASDET_DEFORM_CONV_DEFORM_CONV_CORE_H_
