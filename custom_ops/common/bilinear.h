// Bilinear interpolation helpers shared by the CPU (g++) and CUDA (nvcc) kernels of every family.
//
// This header includes no TensorFlow header on purpose: the .cu.cc files that use it are compiled
// by nvcc, and TensorFlow's pip headers do not compile under nvcc. Everything here is plain math on
// raw indices and works on host and device.
#ifndef KERASDET_COMMON_BILINEAR_H_
#define KERASDET_COMMON_BILINEAR_H_

#include <math.h>

#if defined(__CUDACC__)
#define KD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KD_HOST_DEVICE inline
#endif

namespace kerasdet {

// The four grid points around a sample and their weights. A weight is 0 for a point that does not
// contribute; its index is then clamped into the map so that reading it is always safe.
struct BilinearTap {
  int y0, x0, y1, x1;
  float w00, w01, w10, w11;  // weights of (y0,x0), (y0,x1), (y1,x0), (y1,x1)
  // d(value)/dy and d(value)/dx are (w_dy00 * v00 + ...): the weights' derivatives, 0 where the
  // sample is clamped to the border or outside the map (the value does not move there).
  float dy00, dy01, dy10, dy11;
  float dx00, dx01, dx10, dx11;
};

// RoIAlign's rule (Mask R-CNN, Detectron): a sample more than one pixel outside the map reads 0,
// one within [-1, 0) or beyond the last row/column clamps to the border.
KD_HOST_DEVICE BilinearTap roi_align_tap(float y, float x, int height, int width) {
  BilinearTap t;
  if (y < -1.0f || y > static_cast<float>(height) || x < -1.0f || x > static_cast<float>(width) ||
      height <= 0 || width <= 0) {
    t.y0 = t.x0 = t.y1 = t.x1 = 0;
    t.w00 = t.w01 = t.w10 = t.w11 = 0.f;
    t.dy00 = t.dy01 = t.dy10 = t.dy11 = 0.f;
    t.dx00 = t.dx01 = t.dx10 = t.dx11 = 0.f;
    return t;
  }
  bool y_moves = true, x_moves = true;
  if (y <= 0.f) { y = 0.f; y_moves = false; }
  if (x <= 0.f) { x = 0.f; x_moves = false; }
  int y_low = static_cast<int>(y);
  int x_low = static_cast<int>(x);
  int y_high, x_high;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = static_cast<float>(y_low);
    y_moves = false;
  } else {
    y_high = y_low + 1;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = static_cast<float>(x_low);
    x_moves = false;
  } else {
    x_high = x_low + 1;
  }
  const float ly = y - y_low, lx = x - x_low;
  const float hy = 1.f - ly, hx = 1.f - lx;
  t.y0 = y_low; t.y1 = y_high; t.x0 = x_low; t.x1 = x_high;
  t.w00 = hy * hx; t.w01 = hy * lx; t.w10 = ly * hx; t.w11 = ly * lx;
  const float sy = y_moves ? 1.f : 0.f, sx = x_moves ? 1.f : 0.f;
  t.dy00 = -hx * sy; t.dy01 = -lx * sy; t.dy10 = hx * sy; t.dy11 = lx * sy;
  t.dx00 = -hy * sx; t.dx01 = hy * sx; t.dx10 = -ly * sx; t.dx11 = ly * sx;
  return t;
}

// Deformable-convolution rule: each of the four grid points that lies outside the map reads 0
// (no clamping). Offered for the deform_conv family; the RoI families use roi_align_tap.
KD_HOST_DEVICE BilinearTap zero_padded_tap(float y, float x, int height, int width) {
  BilinearTap t;
  const float fy = floorf(y), fx = floorf(x);
  const float ly = y - fy, lx = x - fx, hy = 1.f - ly, hx = 1.f - lx;
  const int y0 = static_cast<int>(fy), x0 = static_cast<int>(fx);
  const int y1 = y0 + 1, x1 = x0 + 1;
  const bool iy0 = y0 >= 0 && y0 < height, iy1 = y1 >= 0 && y1 < height;
  const bool ix0 = x0 >= 0 && x0 < width, ix1 = x1 >= 0 && x1 < width;
  const float m00 = (iy0 && ix0) ? 1.f : 0.f, m01 = (iy0 && ix1) ? 1.f : 0.f;
  const float m10 = (iy1 && ix0) ? 1.f : 0.f, m11 = (iy1 && ix1) ? 1.f : 0.f;
  t.y0 = iy0 ? y0 : 0; t.y1 = iy1 ? y1 : 0; t.x0 = ix0 ? x0 : 0; t.x1 = ix1 ? x1 : 0;
  t.w00 = hy * hx * m00; t.w01 = hy * lx * m01; t.w10 = ly * hx * m10; t.w11 = ly * lx * m11;
  t.dy00 = -hx * m00; t.dy01 = -lx * m01; t.dy10 = hx * m10; t.dy11 = lx * m11;
  t.dx00 = -hy * m00; t.dx01 = hy * m01; t.dx10 = -ly * m10; t.dx11 = ly * m11;
  return t;
}

// Fast R-CNN's rounding of RoI coordinates: half away from zero, written out so that the
// pure-TensorFlow fallback (sign(v) * floor(|v| + 0.5)) gives bit-identical bins.
KD_HOST_DEVICE float round_half_away(float v) {
  const float r = floorf(fabsf(v) + 0.5f);
  return v < 0.f ? -r : r;
}

}  // namespace kerasdet

#endif  // KERASDET_COMMON_BILINEAR_H_
