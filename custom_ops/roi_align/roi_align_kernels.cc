// CPU kernels of the bilinear RoI family: RoIAlign, PSRoIAlign, DeformRoIPool, DeformPSRoIPool and
// their gradients. One templated implementation serves all four (definition in roi_align_core.h).
//
// Threading: the forward pass splits the output bins over the CPU worker pool (each bin is written
// by one worker). The feature gradient is a scatter, so it is split by input channels instead:
// channel blocks for the plain ops, bins for the position-sensitive ones (a bin owns its input
// channels); no two workers write the same element, and the result is deterministic without
// atomics. The offset gradient is a reduction per (RoI, bin, group) and is split over those.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU  // for OpKernelContext::eigen_device<Eigen::GpuDevice>() (the CUDA stream)
#endif

#include <algorithm>
#include <cstring>
#include <cstdlib>

#include "common/cpu_parallel.h"
#include "common/roi_inputs.h"
#include "roi_align/roi_align_core.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace kerasdet {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

inline bool TapIsEmpty(const BilinearTap& t) {
  return t.w00 == 0.f && t.w01 == 0.f && t.w10 == 0.f && t.w11 == 0.f && t.dy00 == 0.f &&
         t.dy10 == 0.f && t.dx00 == 0.f && t.dx01 == 0.f;
}

inline int NumGroups(const RoIAlignParams& p) { return p.offset_groups > 0 ? p.offset_groups : 1; }

// Shift of bin u (flat r * ph * pw + i * pw + j) for offset group grp, in feature pixels.
inline void BinShift(const RoIAlignParams& p, const RoIAlignGeometry& g, const float* offsets,
                     int64_t u, int grp, float* dy, float* dx) {
  *dy = *dx = 0.f;
  if (p.offset_groups > 0) {
    const float* t = offsets + u * 2 * p.offset_groups + 2 * grp;
    *dx = p.gamma * t[0] * g.roi_w;
    *dy = p.gamma * t[1] * g.roi_h;
  }
}

// Where the channels read for one bin live: `img` (the argument of the unit functions below)
// points at channel 0 of the bin's image, and the channels of an output channel group are
// contiguous at every pixel. The plain ops read the NHWC features directly, the PS ops a
// transposed copy [B, H, W, ph * pw, C_out] (see TransposeBins).
struct Layout {
  int64_t image;  // elements per batch image
  int64_t row;    // elements per feature row
  int64_t pixel;  // elements per pixel
};

Layout NhwcLayout(const RoIAlignParams& p) {
  const int64_t row = static_cast<int64_t>(p.width) * p.channels;
  return {p.height * row, row, p.channels};
}

Layout BinMajorLayout(const RoIAlignParams& p) {
  const int64_t pixel = static_cast<int64_t>(p.pooled_h) * p.pooled_w * p.out_channels;
  return {p.height * p.width * pixel, p.width * pixel, pixel};
}

// Output channels [grp * cpg, (grp + 1) * cpg) of bin u = (r, i, j): og[c] (not yet divided by the
// sample count) += the bilinear samples of the bin.
__attribute__((always_inline)) inline void ForwardUnit(const RoIAlignParams& p, const Layout& L, const float* img,
                        const RoIAlignGeometry& g, int i, int j, int64_t u, const float* offsets,
                        int grp, int cpg, float* og) {
  float dy, dx;
  BinShift(p, g, offsets, u, grp, &dy, &dx);
  const float* ig = img + static_cast<int64_t>(grp) * cpg;
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const float y = sample_y(g, i, iy) + dy;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const float x = sample_x(g, j, ix) + dx;
      const BilinearTap t = roi_align_tap(y, x, p.height, p.width);
      if (TapIsEmpty(t)) continue;
      const float* p00 = ig + t.y0 * L.row + static_cast<int64_t>(t.x0) * L.pixel;
      const float* p01 = ig + t.y0 * L.row + static_cast<int64_t>(t.x1) * L.pixel;
      const float* p10 = ig + t.y1 * L.row + static_cast<int64_t>(t.x0) * L.pixel;
      const float* p11 = ig + t.y1 * L.row + static_cast<int64_t>(t.x1) * L.pixel;
      for (int c = 0; c < cpg; ++c) {
        og[c] += t.w00 * p00[c] + t.w01 * p01[c] + t.w10 * p10[c] + t.w11 * p11[c];
      }
    }
  }
}

// Scatters the grad channels [c0, c1) of bin u (gb = its grad row) into the gradient image `img`.
__attribute__((always_inline)) inline void BackwardFeaturesUnit(const RoIAlignParams& p, const Layout& L, float* img,
                                 const RoIAlignGeometry& g, int i, int j, int64_t u,
                                 const float* offsets, int grp, int c0, int c1, const float* gb) {
  float dy, dx;
  BinShift(p, g, offsets, u, grp, &dy, &dx);
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const float y = sample_y(g, i, iy) + dy;
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const float x = sample_x(g, j, ix) + dx;
      const BilinearTap t = roi_align_tap(y, x, p.height, p.width);
      if (TapIsEmpty(t)) continue;
      const float w00 = t.w00 * g.inv_count, w01 = t.w01 * g.inv_count;
      const float w10 = t.w10 * g.inv_count, w11 = t.w11 * g.inv_count;
      float* p00 = img + t.y0 * L.row + static_cast<int64_t>(t.x0) * L.pixel;
      float* p01 = img + t.y0 * L.row + static_cast<int64_t>(t.x1) * L.pixel;
      float* p10 = img + t.y1 * L.row + static_cast<int64_t>(t.x0) * L.pixel;
      float* p11 = img + t.y1 * L.row + static_cast<int64_t>(t.x1) * L.pixel;
      for (int c = c0; c < c1; ++c) {
        const float gv = gb[c];
        p00[c] += w00 * gv;
        p01[c] += w01 * gv;
        p10[c] += w10 * gv;
        p11[c] += w11 * gv;
      }
    }
  }
}

// One output unit (RoI r, bin (i, j)) of every offset group, averaged over its samples; shared by
// the NHWC and the bin-major (PS) forward loops, which differ only in how they find `img`.
__attribute__((always_inline)) inline void PoolUnit(const RoIAlignParams& p, const Layout& L, const float* img,
                                                    const RoIAlignGeometry& g, int i, int j, int64_t u,
                                                    const float* offsets, int groups, int cpg, float* out) {
  std::fill(out, out + p.out_channels, 0.f);
  for (int grp = 0; grp < groups; ++grp) {
    ForwardUnit(p, L, img, g, i, j, u, offsets, grp, cpg, out + grp * cpg);
  }
  for (int c = 0; c < p.out_channels; ++c) out[c] *= g.inv_count;
}

// d loss / d offsets[r, i, j, 2 grp : 2 grp + 2] of bin u (gb = its grad row); with Scatter, also
// the feature gradient of the group's channels into `gimg` (one tap computation for both).
// The upstream gradient of a channel is the same for every sample of the bin, so the samples'
// position derivatives are summed per channel first (independent lanes the compiler vectorizes)
// and dotted with the gradient once: a per-sample dot product is a serial float reduction that
// the compiler may not reorder, and it dominated the deformable gradients.
template <bool Scatter>
__attribute__((always_inline)) inline void BackwardOffsetsUnit(const RoIAlignParams& p, const Layout& L, const float* img,
                                float* gimg, const RoIAlignGeometry& g, int i, int j, int64_t u,
                                const float* offsets, int grp, int cpg, const float* gb,
                                float* grad_offsets) {
  constexpr int kChunk = 64;
  const float* gg = gb + static_cast<int64_t>(grp) * cpg;
  float dy, dx;
  BinShift(p, g, offsets, u, grp, &dy, &dx);
  float sum_y = 0.f, sum_x = 0.f;
  for (int c0 = 0; c0 < cpg; c0 += kChunk) {
    const int n = std::min(kChunk, cpg - c0);
    const int64_t first = static_cast<int64_t>(grp) * cpg + c0;
    const float* ig = img + first;
    const float* gc = gg + c0;
    float ay[kChunk] = {}, ax[kChunk] = {};
    for (int iy = 0; iy < g.grid_h; ++iy) {
      const float y = sample_y(g, i, iy) + dy;
      for (int ix = 0; ix < g.grid_w; ++ix) {
        const float x = sample_x(g, j, ix) + dx;
        const BilinearTap t = roi_align_tap(y, x, p.height, p.width);
        if (TapIsEmpty(t)) continue;
        const int64_t a00 = t.y0 * L.row + static_cast<int64_t>(t.x0) * L.pixel;
        const int64_t a01 = t.y0 * L.row + static_cast<int64_t>(t.x1) * L.pixel;
        const int64_t a10 = t.y1 * L.row + static_cast<int64_t>(t.x0) * L.pixel;
        const int64_t a11 = t.y1 * L.row + static_cast<int64_t>(t.x1) * L.pixel;
        const float *p00 = ig + a00, *p01 = ig + a01, *p10 = ig + a10, *p11 = ig + a11;
        for (int c = 0; c < n; ++c) {
          const float v00 = p00[c], v01 = p01[c], v10 = p10[c], v11 = p11[c];
          ay[c] += t.dy00 * v00 + t.dy01 * v01 + t.dy10 * v10 + t.dy11 * v11;
          ax[c] += t.dx00 * v00 + t.dx01 * v01 + t.dx10 * v10 + t.dx11 * v11;
        }
        if constexpr (Scatter) {
          const float w00 = t.w00 * g.inv_count, w01 = t.w01 * g.inv_count;
          const float w10 = t.w10 * g.inv_count, w11 = t.w11 * g.inv_count;
          float* gi = gimg + first;
          float *q00 = gi + a00, *q01 = gi + a01, *q10 = gi + a10, *q11 = gi + a11;
          for (int c = 0; c < n; ++c) {
            const float gv = gc[c];
            q00[c] += w00 * gv;
            q01[c] += w01 * gv;
            q10[c] += w10 * gv;
            q11[c] += w11 * gv;
          }
        }
      }
    }
    for (int c = 0; c < n; ++c) {
      sum_y += gc[c] * ay[c];
      sum_x += gc[c] * ax[c];
    }
  }
  float* go = grad_offsets + u * 2 * p.offset_groups + 2 * grp;
  go[0] = sum_x * g.inv_count * p.gamma * g.roi_w;
  go[1] = sum_y * g.inv_count * p.gamma * g.roi_h;
}

// The loops below are KD_CPU_CLONES (common/cpu_parallel.h): TensorFlow's portable compile flags
// alone would leave the channel loops at 128-bit SSE.

// Forward of the plain ops over the bins [begin, end) (flat r * ph * pw + i * pw + j).
KD_CPU_CLONES void ForwardBins(const RoIAlignParams& p, const float* features, const float* boxes,
                               const int* box_indices, const float* offsets, float* output,
                               int64_t begin, int64_t end) {
  const int bins = p.pooled_h * p.pooled_w;
  const int groups = NumGroups(p);
  const int cpg = p.out_channels / groups;
  const Layout L = NhwcLayout(p);
  for (int64_t u = begin; u < end; ++u) {
    const int r = static_cast<int>(u / bins);
    const int i = static_cast<int>((u % bins) / p.pooled_w), j = static_cast<int>(u % p.pooled_w);
    const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
    const float* img = features + box_indices[r] * L.image;
    PoolUnit(p, L, img, g, i, j, u, offsets, groups, cpg, output + u * p.out_channels);
  }
}

// Feature gradient of the plain ops for the channel blocks [begin, end) (block = channels of one
// offset group): every block walks all RoIs and owns its channels of the whole gradient map.
KD_CPU_CLONES void BackwardFeatures(const RoIAlignParams& p, const float* grad, const float* boxes,
                                    const int* box_indices, const float* offsets,
                                    float* grad_features, int block, int64_t begin, int64_t end) {
  const int groups = NumGroups(p);
  const int cpg = p.out_channels / groups;
  const int blocks_per_group = (cpg + block - 1) / block;
  const Layout L = NhwcLayout(p);
  for (int64_t unit = begin; unit < end; ++unit) {
    const int grp = static_cast<int>(unit / blocks_per_group);
    const int c0 = grp * cpg + static_cast<int>(unit % blocks_per_group) * block;
    const int c1 = std::min(c0 + block, (grp + 1) * cpg);
    for (int r = 0; r < p.num_rois; ++r) {
      const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
      if (g.grid_h <= 0 || g.grid_w <= 0) continue;
      float* img = grad_features + box_indices[r] * L.image;
      for (int i = 0; i < p.pooled_h; ++i) {
        for (int j = 0; j < p.pooled_w; ++j) {
          const int64_t u = (static_cast<int64_t>(r) * p.pooled_h + i) * p.pooled_w + j;
          BackwardFeaturesUnit(p, L, img, g, i, j, u, offsets, grp, c0, c1,
                               grad + u * p.out_channels);
        }
      }
    }
  }
}

// Offset gradient of the plain deformable op for the (bin, group) units [begin, end).
KD_CPU_CLONES void BackwardOffsets(const RoIAlignParams& p, const float* grad,
                                   const float* features, const float* boxes,
                                   const int* box_indices, const float* offsets,
                                   float* grad_offsets, int64_t begin, int64_t end) {
  const int bins = p.pooled_h * p.pooled_w;
  const int groups = NumGroups(p);
  const int cpg = p.out_channels / groups;
  const Layout L = NhwcLayout(p);
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t u = unit / groups;
    const int grp = static_cast<int>(unit % groups);
    const int r = static_cast<int>(u / bins);
    const int i = static_cast<int>((u % bins) / p.pooled_w), j = static_cast<int>(u % p.pooled_w);
    const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
    BackwardOffsetsUnit<false>(p, L, features + box_indices[r] * L.image, nullptr, g, i, j, u,
                               offsets, grp, cpg, grad + u * p.out_channels, grad_offsets);
  }
}

// Position-sensitive ops. Output channel c of bin q = i * pw + j reads input channel c * ph * pw + q,
// so in NHWC the C_out channels of a bin are ph * pw floats apart (one cache line each). The PS
// kernels transpose every pixel's channels into [ph * pw, C_out] (TransposeBins: each pixel's
// 4 KB-ish record is read and written contiguously, one streaming pass), so that a bin's channels
// at a pixel are one contiguous run, and walk the RoIs bin-major: the samples of one bin touch one
// C_out-float slice per pixel, an L2-sized working set, and consecutive bins share cache lines.
// The feature gradient is accumulated in the same layout, split over bins: bin q writes only its
// own channels, so the workers never write the same element (no atomics, no per-thread copies,
// deterministic), and UntransposeBins writes every element of the NHWC gradient once.
// (This replaced whole-map bin planes [B, ph * pw, H, W, C_out], whose transposes write and read
// ph * pw streams per pixel, and a channel-block split of the gradient, which computed every tap
// once per block; measured together, about 1.5x slower than this.)

// t[pix, q, c] = nhwc[pix, c * bins + q] for the pixels [begin, end) (b * H * W + y * W + x).
KD_CPU_CLONES void TransposeBins(const RoIAlignParams& p, const float* nhwc, float* t,
                                 int64_t begin, int64_t end) {
  const int bins = p.pooled_h * p.pooled_w, cout = p.out_channels;
  for (int64_t pix = begin; pix < end; ++pix) {
    const float* src = nhwc + pix * p.channels;
    float* dst = t + pix * p.channels;
    for (int q = 0; q < bins; ++q) {
      for (int c = 0; c < cout; ++c) dst[q * cout + c] = src[c * bins + q];
    }
  }
}

// nhwc[pix, c * bins + q] = t[pix, q, c] for the pixels [begin, end).
KD_CPU_CLONES void UntransposeBins(const RoIAlignParams& p, const float* t, float* nhwc,
                                   int64_t begin, int64_t end) {
  const int bins = p.pooled_h * p.pooled_w, cout = p.out_channels;
  for (int64_t pix = begin; pix < end; ++pix) {
    const float* src = t + pix * p.channels;
    float* dst = nhwc + pix * p.channels;
    for (int c = 0; c < cout; ++c) {
      for (int q = 0; q < bins; ++q) dst[c * bins + q] = src[q * cout + c];
    }
  }
}

// Forward of the PS ops for the units [begin, end), unit v = q * R + r (bin-major, so that a run of
// units reads one bin's channels of the transposed map).
KD_CPU_CLONES void PSForward(const RoIAlignParams& p, const float* t, const float* boxes,
                             const int* box_indices, const float* offsets, float* output,
                             int64_t begin, int64_t end) {
  const int bins = p.pooled_h * p.pooled_w;
  const int groups = NumGroups(p);
  const int cpg = p.out_channels / groups;
  const Layout L = BinMajorLayout(p);
  for (int64_t v = begin; v < end; ++v) {
    const int q = static_cast<int>(v / p.num_rois), r = static_cast<int>(v % p.num_rois);
    const int i = q / p.pooled_w, j = q % p.pooled_w;
    const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
    const int64_t u = static_cast<int64_t>(r) * bins + q;
    const float* img = t + box_indices[r] * L.image + q * p.out_channels;
    PoolUnit(p, L, img, g, i, j, u, offsets, groups, cpg, output + u * p.out_channels);
  }
}

// Gradient of the PS ops for the bins [qa, qb) into the transposed gradient gt (and, with the
// transposed features ft, the offset gradient). Bins own disjoint channels: race-free.
KD_CPU_CLONES void PSBackward(const RoIAlignParams& p, const float* grad, const float* ft,
                              const float* boxes, const int* box_indices, const float* offsets,
                              float* gt, float* grad_offsets, int64_t qa, int64_t qb) {
  const int bins = p.pooled_h * p.pooled_w;
  const int groups = NumGroups(p);
  const int cpg = p.out_channels / groups;
  const Layout L = BinMajorLayout(p);
  for (int q = static_cast<int>(qa); q < qb; ++q) {
    const int i = q / p.pooled_w, j = q % p.pooled_w;
    for (int r = 0; r < p.num_rois; ++r) {
      const RoIAlignGeometry g = roi_align_geometry(boxes + 4 * r, p);
      const int64_t u = static_cast<int64_t>(r) * bins + q;
      const float* gb = grad + u * p.out_channels;
      const int64_t at = box_indices[r] * L.image + q * p.out_channels;
      for (int grp = 0; grp < groups; ++grp) {
        if (ft != nullptr) {
          BackwardOffsetsUnit<true>(p, L, ft + at, gt + at, g, i, j, u, offsets, grp, cpg, gb,
                                    grad_offsets);
        } else if (g.grid_h > 0 && g.grid_w > 0) {
          BackwardFeaturesUnit(p, L, gt + at, g, i, j, u, offsets, grp, grp * cpg,
                               (grp + 1) * cpg, gb);
        }
      }
    }
  }
}

// OP_REQUIRES for functions that return a value.
#define OP_REQUIRES_VALUE_CHECK(CTX, EXP, RET, STATUS) \
  do {                                                 \
    if (!TF_PREDICT_TRUE(EXP)) {                       \
      (CTX)->CtxFailure(__FILE__, __LINE__, (STATUS)); \
      return RET;                                      \
    }                                                  \
  } while (0)

// Attributes and parameter assembly shared by the forward and gradient kernels.
template <bool PS, bool Deform>
class RoIAlignFamilyBase : public OpKernel {
 public:
  explicit RoIAlignFamilyBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadPooledSize(ctx, &pooled_h_, &pooled_w_);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("spatial_scale", &spatial_scale_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sampling_ratio", &sampling_ratio_));
    aligned_ = true;  // position-sensitive ops always use continuous, half-pixel-shifted coordinates
    if (!PS) OP_REQUIRES_OK(ctx, ctx->GetAttr("aligned", &aligned_));
    gamma_ = 0.f;
    if (Deform) OP_REQUIRES_OK(ctx, ctx->GetAttr("gamma", &gamma_));
  }

 protected:
  // Fills params from the features shape; checks channels and offsets. Sets ctx status on error.
  RoIAlignParams MakeParams(OpKernelContext* ctx, const TensorShape& features, int64_t num_rois,
                            const Tensor* offsets) {
    RoIAlignParams p;
    p.batch = static_cast<int>(features.dim_size(0));
    p.height = static_cast<int>(features.dim_size(1));
    p.width = static_cast<int>(features.dim_size(2));
    p.channels = static_cast<int>(features.dim_size(3));
    p.num_rois = static_cast<int>(num_rois);
    p.pooled_h = pooled_h_;
    p.pooled_w = pooled_w_;
    p.spatial_scale = spatial_scale_;
    p.sampling_ratio = sampling_ratio_;
    p.aligned = aligned_;
    p.position_sensitive = PS;
    p.gamma = gamma_;
    p.offset_groups = 0;
    p.out_channels = p.channels;
    if (PS) {
      const int bins = pooled_h_ * pooled_w_;
      OP_REQUIRES_VALUE_CHECK(ctx, p.channels % bins == 0, p,
                              InvalidArgument("features has ", p.channels,
                                              " channels, which is not divisible by output "
                                              "height * width = ", bins,
                                              " as position-sensitive pooling needs"));
      p.out_channels = p.channels / bins;
    }
    if (Deform) {
      OP_REQUIRES_VALUE_CHECK(
          ctx,
          offsets->dims() == 4 && offsets->dim_size(0) == num_rois &&
              offsets->dim_size(1) == pooled_h_ && offsets->dim_size(2) == pooled_w_ &&
              offsets->dim_size(3) >= 2 && offsets->dim_size(3) % 2 == 0,
          p,
          InvalidArgument("offsets must be [R, ph, pw, 2 * groups] = [", num_rois, ", ", pooled_h_,
                          ", ", pooled_w_, ", 2 * groups], got shape ",
                          offsets->shape().DebugString()));
      p.offset_groups = static_cast<int>(offsets->dim_size(3) / 2);
      OP_REQUIRES_VALUE_CHECK(ctx, p.out_channels % p.offset_groups == 0, p,
                              InvalidArgument("offsets has ", p.offset_groups,
                                              " offset groups, which do not divide the ",
                                              p.out_channels, " output channels"));
    }
    return p;
  }

  int pooled_h_, pooled_w_, sampling_ratio_;
  float spatial_scale_, gamma_;
  bool aligned_;
};

// GPU = true: the same op on TensorFlow's GPU device through the raw-pointer CUDA launchers of
// roi_align_gpu.cu.cc (registered in the GPU library only). Box index values live in device
// memory there and are not checked (an out-of-range box pools to 0).
template <bool PS, bool Deform, bool GPU = false>
class RoIAlignFamilyOp : public RoIAlignFamilyBase<PS, Deform> {
 public:
  using Base = RoIAlignFamilyBase<PS, Deform>;
  explicit RoIAlignFamilyOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const Tensor& boxes = ctx->input(1);
    const Tensor& box_indices = ctx->input(2);
    ValidateRoIInputs(ctx, features, boxes, box_indices, /*check_values=*/!GPU);
    if (!ctx->status().ok()) return;
    const Tensor* offsets = Deform ? &ctx->input(3) : nullptr;
    const RoIAlignParams p = this->MakeParams(ctx, features.shape(), boxes.dim_size(0), offsets);
    if (!ctx->status().ok()) return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({p.num_rois, p.pooled_h, p.pooled_w, p.out_channels}),
                            &output));
    if (output->NumElements() == 0) return;
    const float* f = features.flat<float>().data();
    const float* b = boxes.flat<float>().data();
    const int* bi = box_indices.flat<int32_t>().data();
    const float* off = Deform ? offsets->flat<float>().data() : nullptr;
    float* out = output->flat<float>().data();
    if constexpr (GPU) {
      const int err = LaunchRoIAlignForwardGPU(p, f, b, bi, off, out, GpuStream(ctx));
      OP_REQUIRES(ctx, err == 0, tensorflow::errors::Internal("CUDA error ", err, " in ",
                                                              this->name()));
      return;
    }
    if (features.NumElements() == 0) {
      std::memset(out, 0, output->NumElements() * sizeof(float));
      return;
    }
    if (PS) {  // bin-major transposed copy (see TransposeBins), then bin-major units
      Tensor transposed;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({features.NumElements()}), &transposed));
      float* t = transposed.flat<float>().data();
      const int64_t pixels = features.NumElements() / p.channels;
      ShardOnCpu(ctx, pixels, 3 * p.channels,
                 [&](int64_t begin, int64_t end) { TransposeBins(p, f, t, begin, end); });
      const int64_t units = static_cast<int64_t>(p.num_rois) * p.pooled_h * p.pooled_w;
      ShardOnCpu(ctx, units, 40 * p.out_channels,
                 [&](int64_t begin, int64_t end) {
                   PSForward(p, t, b, bi, off, out, begin, end);
                        });
      return;
    }
    const int64_t units = static_cast<int64_t>(p.num_rois) * p.pooled_h * p.pooled_w;
    ShardOnCpu(ctx, units, /*cost_per_unit=*/40 * p.out_channels,
               [&](int64_t begin, int64_t end) {
                 ForwardBins(p, f, b, bi, off, out, begin, end);
                      });
  }
};

template <bool PS, bool Deform, bool GPU = false>
class RoIAlignFamilyGradOp : public RoIAlignFamilyBase<PS, Deform> {
 public:
  using Base = RoIAlignFamilyBase<PS, Deform>;
  explicit RoIAlignFamilyGradOp(OpKernelConstruction* ctx) : Base(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    // Non-deformable: (grad, boxes, box_indices, features_shape);
    // deformable: (grad, features, boxes, box_indices, offsets).
    const Tensor& grad = ctx->input(0);
    TensorShape features_shape;
    const Tensor* features = nullptr;
    const Tensor* offsets = nullptr;
    int box_input = 1;
    if (Deform) {
      features = &ctx->input(1);
      features_shape = features->shape();
      offsets = &ctx->input(4);
      box_input = 2;
    } else {
      const Tensor& shape = ctx->input(3);
      OP_REQUIRES(ctx, shape.dims() == 1 && shape.NumElements() == 4,
                  InvalidArgument("features_shape must be a 4-vector, got shape ",
                                  shape.shape().DebugString()));
      const auto dims = shape.vec<int32_t>();
      for (int k = 0; k < 4; ++k) {
        OP_REQUIRES(ctx, dims(k) >= 0,
                    InvalidArgument("features_shape has a negative dimension: ", dims(k)));
        features_shape.AddDim(dims(k));
      }
    }
    const Tensor& boxes = ctx->input(box_input);
    const Tensor& box_indices = ctx->input(box_input + 1);
    OP_REQUIRES(ctx, features_shape.dims() == 4,
                InvalidArgument("features must be a rank-4 NHWC tensor, got shape ",
                                features_shape.DebugString()));
    OP_REQUIRES(ctx, boxes.dims() == 2 && boxes.dim_size(1) == 4 && box_indices.dims() == 1 &&
                         box_indices.dim_size(0) == boxes.dim_size(0),
                InvalidArgument("boxes must be [R, 4] and box_indices [R]"));
    if constexpr (!GPU) {
      const int64_t batch = features_shape.dim_size(0);
      const auto idx = box_indices.flat<int32_t>();
      for (int64_t r = 0; r < idx.size(); ++r) {
        OP_REQUIRES(ctx, idx(r) >= 0 && idx(r) < batch,
                    InvalidArgument("box_indices[", r, "] = ", idx(r),
                                    " is out of range: features has batch size ", batch));
      }
    }
    const RoIAlignParams p = this->MakeParams(ctx, features_shape, boxes.dim_size(0), offsets);
    if (!ctx->status().ok()) return;
    OP_REQUIRES(ctx, grad.shape() == TensorShape({p.num_rois, p.pooled_h, p.pooled_w,
                                                  p.out_channels}),
                InvalidArgument("grad must be shaped like the op's output, got ",
                                grad.shape().DebugString()));

    Tensor* grad_features = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, features_shape, &grad_features));
    float* gf = grad_features->flat<float>().data();
    float* goff = nullptr;
    Tensor* grad_offsets = nullptr;
    if (Deform) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, offsets->shape(), &grad_offsets));
      goff = grad_offsets->flat<float>().data();
    }
    const float* g = grad.flat<float>().data();
    const float* b = boxes.flat<float>().data();
    const int* bi = box_indices.flat<int32_t>().data();
    const float* off = Deform ? offsets->flat<float>().data() : nullptr;
    if constexpr (GPU) {
      const float* f = Deform ? features->flat<float>().data() : nullptr;
      const int err = LaunchRoIAlignBackwardGPU(p, g, f, b, bi, off, gf, goff, GpuStream(ctx));
      OP_REQUIRES(ctx, err == 0, tensorflow::errors::Internal("CUDA error ", err, " in ",
                                                              this->name()));
      return;
    }
    if (Deform) std::memset(goff, 0, grad_offsets->NumElements() * sizeof(float));
    if (grad.NumElements() == 0 || grad_features->NumElements() == 0) {
      std::memset(gf, 0, grad_features->NumElements() * sizeof(float));
      return;
    }
    const float* f = Deform ? features->flat<float>().data() : nullptr;
    const int groups = NumGroups(p);
    const int cpg = p.out_channels / groups;
    const int bins = p.pooled_h * p.pooled_w;

    if (PS) {  // gf is written whole by UntransposeBins: no zeroing
      const int64_t n = grad_features->NumElements();
      const int64_t pixels = n / p.channels;
      // The gradient (and, deformable, the features) in the bin-major layout of TransposeBins.
      Tensor transposed;
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({Deform ? 2 * n : n}), &transposed));
      float* gt = transposed.flat<float>().data();
      float* ft = Deform ? gt + n : nullptr;
      ShardOnCpu(ctx, pixels, 3 * p.channels,
                 [&](int64_t begin, int64_t end) {
                   std::fill(gt + begin * p.channels, gt + end * p.channels, 0.f);
                          if (Deform) TransposeBins(p, f, ft, begin, end);
                        });
      ShardOnCpu(ctx, bins, int64_t{80} * p.num_rois * p.out_channels,
                 [&](int64_t begin, int64_t end) {
                   PSBackward(p, g, ft, b, bi, off, gt, goff, begin, end);
                        });
      ShardOnCpu(ctx, pixels, 3 * p.channels,
                 [&](int64_t begin, int64_t end) { UntransposeBins(p, gt, gf, begin, end); });
      return;
    }
    std::memset(gf, 0, grad_features->NumElements() * sizeof(float));
    const int threads = CpuThreads(ctx);
    // One block of channels per thread: every block walks all RoIs and scatters into the whole
    // gradient map, so fewer, wider blocks mean fewer passes over memory and fewer tap
    // computations than many narrow blocks.
    const int block = std::max(1, (cpg + threads - 1) / std::max(1, threads));
    const int64_t units = static_cast<int64_t>(groups) * ((cpg + block - 1) / block);
    const int64_t cost = static_cast<int64_t>(p.num_rois) * bins * 40 * block;
    ShardOnCpu(ctx, units, cost, [&](int64_t begin, int64_t end) {
      BackwardFeatures(p, g, b, bi, off, gf, block, begin, end);
    });
    if (Deform) {
      const int64_t bin_units = static_cast<int64_t>(p.num_rois) * bins * groups;
      ShardOnCpu(ctx, bin_units, 80 * cpg, [&](int64_t begin, int64_t end) {
        BackwardOffsets(p, g, f, b, bi, off, goff, begin, end);
      });
    }
  }
};

using tensorflow::DEVICE_CPU;

REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIAlign").Device(DEVICE_CPU),
                        RoIAlignFamilyOp<false, false>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIAlignGrad").Device(DEVICE_CPU),
                        RoIAlignFamilyGradOp<false, false>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIAlign").Device(DEVICE_CPU),
                        RoIAlignFamilyOp<true, false>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIAlignGrad").Device(DEVICE_CPU),
                        RoIAlignFamilyGradOp<true, false>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformRoIPool").Device(DEVICE_CPU),
                        RoIAlignFamilyOp<false, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformRoIPoolGrad").Device(DEVICE_CPU),
                        RoIAlignFamilyGradOp<false, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformPSRoIPool").Device(DEVICE_CPU),
                        RoIAlignFamilyOp<true, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformPSRoIPoolGrad").Device(DEVICE_CPU),
                        RoIAlignFamilyGradOp<true, true>);

#if GOOGLE_CUDA
using tensorflow::DEVICE_GPU;
REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIAlign").Device(DEVICE_GPU),
                        RoIAlignFamilyOp<false, false, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIAlignGrad").Device(DEVICE_GPU)
                            .HostMemory("features_shape"),
                        RoIAlignFamilyGradOp<false, false, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIAlign").Device(DEVICE_GPU),
                        RoIAlignFamilyOp<true, false, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIAlignGrad").Device(DEVICE_GPU)
                            .HostMemory("features_shape"),
                        RoIAlignFamilyGradOp<true, false, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformRoIPool").Device(DEVICE_GPU),
                        RoIAlignFamilyOp<false, true, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformRoIPoolGrad").Device(DEVICE_GPU),
                        RoIAlignFamilyGradOp<false, true, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformPSRoIPool").Device(DEVICE_GPU),
                        RoIAlignFamilyOp<true, true, true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformPSRoIPoolGrad").Device(DEVICE_GPU),
                        RoIAlignFamilyGradOp<true, true, true>);
#endif  // GOOGLE_CUDA

}  // namespace
}  // namespace kerasdet
