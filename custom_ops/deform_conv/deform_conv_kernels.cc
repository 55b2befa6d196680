// CPU (and, with GOOGLE_CUDA, GPU) kernels of KerasDet>DeformConv2D and KerasDet>DeformConv2DGrad.
//
// Forward: deformable im2col into a column buffer [rows, kh * kw * C_in], then one matrix product
// with the kernel seen as [kh * kw * C_in, C_out]. Backward: recompute the columns, grad_kernel +=
// columns^T x grad_output; grad_columns = grad_output x kernel^T (written over the same buffer);
// from grad_columns, the sampling-position derivative gives grad_offset and grad_mask, and a
// col2im scatter gives grad_input. The batch is processed in chunks so the column buffer stays
// under kMaxColumnFloats.
//
// CPU matrix products use the packed AVX-512 / AVX2 SGEMM of deform_conv_gemm.cc (see there why
// not Eigen). They and the sampling loops are sharded over the op's CPU worker threads; each
// thread scatters its input gradient into its own copy, summed at the end (no atomics).
#include <algorithm>
#include <functional>
#include <vector>

#include "common/cpu_parallel.h"
#include "deform_conv/deform_conv_core.h"
#include "deform_conv/deform_conv_gemm.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

#if GOOGLE_CUDA
// The CUDA stream comes from the stream executor as a void* handle, so this file needs no CUDA
// header and no Eigen GPU device (it is compiled by g++; the kernels live in the .cu.cc).
#include "deform_conv/deform_conv_gpu.h"
#include "tensorflow/core/framework/device_base.h"
#include "xla/stream_executor/stream.h"
#endif

namespace kerasdet {
namespace deform_conv {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

// Largest column buffer (floats) before the batch is split into chunks: 64 MiB.
constexpr int64_t kMaxColumnFloats = int64_t{1} << 24;

// ------------------------------------------------------------------------------------------ CPU
// The sampling loops are KD_CPU_CLONES (common/cpu_parallel.h).

// Columns of output rows [row0 + begin, row0 + end) (columns points at row0's row).
KD_CPU_CLONES void Im2ColRange(const Geometry& geo, const float* input, const float* offset,
                               const float* mask, int64_t row0, int64_t begin, int64_t end,
                               float* columns) {
  const int C = geo.channels, cg = geo.group_channels(), K = geo.taps();
  const int64_t P = geo.positions(), image = int64_t{geo.height} * geo.width * C;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = row0 + r;
    const float* img = input + (row / P) * image;
    float* out = columns + r * K * C;
    for (int g = 0; g < geo.groups; ++g) {
      for (int t = 0; t < K; ++t) {
        float m;
        const BilinearTap tap = sample_tap(geo, offset, mask, row, g, t, &m);
        const float w00 = m * tap.w00, w01 = m * tap.w01, w10 = m * tap.w10, w11 = m * tap.w11;
        const float* a = img + (int64_t{tap.y0} * geo.width + tap.x0) * C + g * cg;
        const float* b = img + (int64_t{tap.y0} * geo.width + tap.x1) * C + g * cg;
        const float* c = img + (int64_t{tap.y1} * geo.width + tap.x0) * C + g * cg;
        const float* d = img + (int64_t{tap.y1} * geo.width + tap.x1) * C + g * cg;
        float* dst = out + t * C + g * cg;
        for (int ch = 0; ch < cg; ++ch) {
          dst[ch] = w00 * a[ch] + w01 * b[ch] + w10 * c[ch] + w11 * d[ch];
        }
      }
    }
  }
}

// For rows [row0 + begin, row0 + end), from grad_columns: d(loss)/d(offset), d(loss)/d(mask), and
// the input gradient added into grad_images (the gradient of image `first_image` onward). One pass
// computes each bilinear tap once and reads each corner once for both.
KD_CPU_CLONES void BackwardRange(const Geometry& geo, const float* input, const float* offset,
                                 const float* mask, const float* grad_columns, int64_t row0,
                                 int64_t begin, int64_t end, int64_t first_image,
                                 float* grad_images, float* grad_offset, float* grad_mask) {
  const int C = geo.channels, cg = geo.group_channels(), K = geo.taps();
  const int64_t P = geo.positions(), image = int64_t{geo.height} * geo.width * C;
  // The channel sums run in kLanes independent partial sums: without -ffast-math the compiler
  // may not reorder a float reduction, so a single accumulator would stay scalar.
  constexpr int kLanes = 16;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = row0 + r;
    const float* img = input + (row / P) * image;
    float* gimg = grad_images + (row / P - first_image) * image;
    const float* gcol = grad_columns + r * K * C;
    for (int g = 0; g < geo.groups; ++g) {
      for (int t = 0; t < K; ++t) {
        float m;
        const BilinearTap tap = sample_tap(geo, offset, mask, row, g, t, &m);
        const int64_t at[4] = {(int64_t{tap.y0} * geo.width + tap.x0) * C + g * cg,
                               (int64_t{tap.y0} * geo.width + tap.x1) * C + g * cg,
                               (int64_t{tap.y1} * geo.width + tap.x0) * C + g * cg,
                               (int64_t{tap.y1} * geo.width + tap.x1) * C + g * cg};
        const float *a = img + at[0], *b = img + at[1], *c = img + at[2], *d = img + at[3];
        const float* gc = gcol + t * C + g * cg;
        float sv[kLanes] = {}, sy[kLanes] = {}, sx[kLanes] = {};
        int ch = 0;
        for (; ch + kLanes <= cg; ch += kLanes) {
          for (int j = 0; j < kLanes; ++j) {
            const float va = a[ch + j], vb = b[ch + j], vc = c[ch + j], vd = d[ch + j];
            const float grad = gc[ch + j];
            sv[j] += grad * (tap.w00 * va + tap.w01 * vb + tap.w10 * vc + tap.w11 * vd);
            sy[j] += grad * (tap.dy00 * va + tap.dy01 * vb + tap.dy10 * vc + tap.dy11 * vd);
            sx[j] += grad * (tap.dx00 * va + tap.dx01 * vb + tap.dx10 * vc + tap.dx11 * vd);
          }
        }
        for (; ch < cg; ++ch) {
          const float va = a[ch], vb = b[ch], vc = c[ch], vd = d[ch], grad = gc[ch];
          sv[0] += grad * (tap.w00 * va + tap.w01 * vb + tap.w10 * vc + tap.w11 * vd);
          sy[0] += grad * (tap.dy00 * va + tap.dy01 * vb + tap.dy10 * vc + tap.dy11 * vd);
          sx[0] += grad * (tap.dx00 * va + tap.dx01 * vb + tap.dx10 * vc + tap.dx11 * vd);
        }
        float value = 0.f, dy = 0.f, dx = 0.f;
        for (int j = 0; j < kLanes; ++j) {
          value += sv[j];
          dy += sy[j];
          dx += sx[j];
        }
        const int64_t k = g * K + t;
        grad_offset[row * 2 * geo.groups * K + 2 * k] = m * dy;
        grad_offset[row * 2 * geo.groups * K + 2 * k + 1] = m * dx;
        if (geo.has_mask) grad_mask[row * geo.groups * K + k] = value;

        const float w[4] = {m * tap.w00, m * tap.w01, m * tap.w10, m * tap.w11};
        for (int corner = 0; corner < 4; ++corner) {
          // A corner outside the map has weight 0 and a clamped index: skip it, so that an
          // infinite upstream gradient cannot leak a NaN into an unrelated pixel.
          if (w[corner] == 0.f) continue;
          float* dst = gimg + at[corner];
          const float wc = w[corner];
          for (int j = 0; j < cg; ++j) dst[j] += wc * gc[j];
        }
      }
    }
  }
}

struct CpuBackend {
  static void Shard(OpKernelContext* ctx, int64_t total, int64_t cost,
                    const std::function<void(int64_t, int64_t)>& work) {
    ShardOnCpu(ctx, total, cost, work);
  }

  static bool Im2Col(OpKernelContext* ctx, const Geometry& geo, const float* input,
                     const float* offset, const float* mask, int64_t row0, int64_t rows,
                     float* columns) {
    Shard(ctx, rows, 12 * geo.col_width(), [&](int64_t begin, int64_t end) {
      Im2ColRange(geo, input, offset, mask, row0, begin, end, columns);
    });
    return true;
  }

  static bool Gemm(OpKernelContext* ctx, bool trans_a, bool trans_b, int64_t m, int64_t n,
                   int64_t k, const float* a, const float* b, float* c, bool accumulate) {
    Sgemm(trans_a, trans_b, m, n, k, a, b, c, accumulate,
          [ctx](int64_t total, int64_t cost, const std::function<void(int64_t, int64_t)>& work) {
            Shard(ctx, total, cost, work);
          });
    return true;
  }

  static bool Col2ImAndCoordinateGrad(OpKernelContext* ctx, const Geometry& geo,
                                      const float* input, const float* offset, const float* mask,
                                      const float* grad_columns, int64_t row0, int64_t rows,
                                      float* grad_input, float* grad_offset, float* grad_mask) {
    // Rows are split into one part per worker thread. Part 0 adds into grad_input; the others
    // into zeroed private copies of this chunk's input gradient that are summed in afterwards,
    // because parts may sample the same pixels. (A channel-sharded scatter needs no copies, but
    // in a perf profile of the benchmark shape it and its separate offset pass cost ~4x this one
    // pass: it walks every tap once per channel block.)
    const int64_t P = geo.positions(), image = int64_t{geo.height} * geo.width * geo.channels;
    const int64_t first_image = row0 / P, images = (row0 + rows - 1) / P - first_image + 1;
    const int64_t chunk_floats = images * image;
    const int threads = CpuThreads(ctx);
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, rows));
    Tensor copies;
    float* extra = nullptr;
    if (parts > 1) {
      if (!ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({parts - 1, chunk_floats}), &copies)
               .ok())
        return false;
      extra = copies.flat<float>().data();
      std::fill(extra, extra + (parts - 1) * chunk_floats, 0.f);
    }
    float* own = grad_input + first_image * image;
    Shard(ctx, parts, rows / parts * 40 * geo.col_width(), [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) {
        float* target = part == 0 ? own : extra + (part - 1) * chunk_floats;
        BackwardRange(geo, input, offset, mask, grad_columns, row0, rows * part / parts,
                      rows * (part + 1) / parts, first_image, target, grad_offset, grad_mask);
      }
    });
    if (parts > 1) {
      Shard(ctx, chunk_floats, 2 * parts, [&](int64_t begin, int64_t end) {
        for (int64_t part = 1; part < parts; ++part) {
          const float* src = extra + (part - 1) * chunk_floats;
          for (int64_t i = begin; i < end; ++i) own[i] += src[i];
        }
      });
    }
    return true;
  }

  static bool Zero(OpKernelContext* ctx, float* data, int64_t count) {
    std::fill(data, data + count, 0.f);
    return true;
  }
};

#if GOOGLE_CUDA
struct GpuBackend {
  static void* Stream(OpKernelContext* ctx) {
    return ctx->op_device_context()->stream()->platform_specific_handle().stream;
  }
  static bool Im2Col(OpKernelContext* ctx, const Geometry& geo, const float* input,
                     const float* offset, const float* mask, int64_t row0, int64_t rows,
                     float* columns) {
    return LaunchIm2Col(geo, input, offset, mask, row0, rows, columns, Stream(ctx));
  }
  static bool Gemm(OpKernelContext* ctx, bool trans_a, bool trans_b, int64_t m, int64_t n,
                   int64_t k, const float* a, const float* b, float* c, bool accumulate) {
    return LaunchGemm(trans_a, trans_b, m, n, k, a, b, c, accumulate, Stream(ctx));
  }
  static bool Col2ImAndCoordinateGrad(OpKernelContext* ctx, const Geometry& geo,
                                      const float* input, const float* offset, const float* mask,
                                      const float* grad_columns, int64_t row0, int64_t rows,
                                      float* grad_input, float* grad_offset, float* grad_mask) {
    return LaunchCol2ImAndCoordinateGrad(geo, input, offset, mask, grad_columns, row0, rows,
                                         grad_input, grad_offset, grad_mask, Stream(ctx));
  }
  static bool Zero(OpKernelContext* ctx, float* data, int64_t count) {
    return LaunchZero(data, count, Stream(ctx));
  }
};
#endif  // GOOGLE_CUDA

// ------------------------------------------------------------------------------ shared op logic
class DeformConvBase : public OpKernel {
 public:
  explicit DeformConvBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("strides", &strides_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("pads", &pads_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dilations", &dilations_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("deformable_groups", &groups_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_mask", &has_mask_));
    OP_REQUIRES(ctx, strides_.size() == 2 && strides_[0] >= 1 && strides_[1] >= 1,
                InvalidArgument("strides must be two integers >= 1"));
    OP_REQUIRES(ctx, pads_.size() == 2 && pads_[0] >= 0 && pads_[1] >= 0,
                InvalidArgument("padding must be two integers >= 0"));
    OP_REQUIRES(ctx, dilations_.size() == 2 && dilations_[0] >= 1 && dilations_[1] >= 1,
                InvalidArgument("dilation must be two integers >= 1"));
    OP_REQUIRES(ctx, groups_ >= 1, InvalidArgument("deformable_groups must be >= 1"));
  }

 protected:
  // Checks the inputs against each other (messages name the Python arguments) and fills geo.
  bool MakeGeometry(OpKernelContext* ctx, Geometry* geo) {
    const Tensor& input = ctx->input(0);
    const Tensor& offset = ctx->input(1);
    const Tensor& mask = ctx->input(2);
    const Tensor& kernel = ctx->input(3);
    auto fail = [ctx](const absl::Status& status) {
      ctx->CtxFailure(__FILE__, __LINE__, status);
      return false;
    };
    if (input.dims() != 4)
      return fail(InvalidArgument("deform_conv2d: inputs must be [B, H, W, C_in], got shape ",
                                  input.shape().DebugString()));
    if (kernel.dims() != 4)
      return fail(InvalidArgument("deform_conv2d: kernel must be [kh, kw, C_in, C_out], got shape ",
                                  kernel.shape().DebugString()));
    if (kernel.dim_size(2) != input.dim_size(3))
      return fail(InvalidArgument("deform_conv2d: kernel expects ", kernel.dim_size(2),
                                  " input channels but inputs has ", input.dim_size(3)));
    if (input.dim_size(3) % groups_ != 0)
      return fail(InvalidArgument("deform_conv2d: inputs channels (", input.dim_size(3),
                                  ") must be divisible by deformable_groups (", groups_, ")"));
    for (int d = 0; d < 4; ++d) {
      if (input.dim_size(d) >= (int64_t{1} << 31) || kernel.dim_size(d) >= (int64_t{1} << 31))
        return fail(InvalidArgument("deform_conv2d: dimensions must fit in 32 bits"));
    }
    geo->batch = static_cast<int>(input.dim_size(0));
    geo->height = static_cast<int>(input.dim_size(1));
    geo->width = static_cast<int>(input.dim_size(2));
    geo->channels = static_cast<int>(input.dim_size(3));
    geo->kernel_h = static_cast<int>(kernel.dim_size(0));
    geo->kernel_w = static_cast<int>(kernel.dim_size(1));
    geo->out_channels = static_cast<int>(kernel.dim_size(3));
    geo->stride_h = strides_[0];
    geo->stride_w = strides_[1];
    geo->pad_h = pads_[0];
    geo->pad_w = pads_[1];
    geo->dilation_h = dilations_[0];
    geo->dilation_w = dilations_[1];
    geo->groups = groups_;
    geo->has_mask = has_mask_;
    const int64_t span_h = int64_t{geo->dilation_h} * (geo->kernel_h - 1) + 1;
    const int64_t span_w = int64_t{geo->dilation_w} * (geo->kernel_w - 1) + 1;
    const int64_t out_h = (geo->height + 2 * int64_t{geo->pad_h} - span_h) / geo->stride_h + 1;
    const int64_t out_w = (geo->width + 2 * int64_t{geo->pad_w} - span_w) / geo->stride_w + 1;
    if (geo->height + 2 * int64_t{geo->pad_h} < span_h || geo->width + 2 * int64_t{geo->pad_w} < span_w ||
        geo->kernel_h < 1 || geo->kernel_w < 1)
      return fail(InvalidArgument("deform_conv2d: inputs of spatial size ", geo->height, "x",
                                  geo->width, " is too small for a ", geo->kernel_h, "x",
                                  geo->kernel_w, " kernel with this padding and dilation"));
    geo->out_height = static_cast<int>(out_h);
    geo->out_width = static_cast<int>(out_w);
    const int64_t taps = int64_t{groups_} * geo->kernel_h * geo->kernel_w;
    const TensorShape want_offset({geo->batch, out_h, out_w, 2 * taps});
    if (offset.shape() != want_offset)
      return fail(InvalidArgument("deform_conv2d: offsets must have shape ",
                                  want_offset.DebugString(), " ([B, H_out, W_out, 2 * ",
                                  "deformable_groups * kh * kw]), got ",
                                  offset.shape().DebugString()));
    if (has_mask_) {
      const TensorShape want_mask({geo->batch, out_h, out_w, taps});
      if (mask.shape() != want_mask)
        return fail(InvalidArgument("deform_conv2d: mask must have shape ", want_mask.DebugString(),
                                    " ([B, H_out, W_out, deformable_groups * kh * kw]), got ",
                                    mask.shape().DebugString()));
    }
    return true;
  }

  // Images per chunk so that the column buffer stays under kMaxColumnFloats (at least one).
  static int64_t ChunkImages(const Geometry& geo) {
    const int64_t per_image = std::max<int64_t>(1, geo.positions() * geo.col_width());
    return std::max<int64_t>(1, std::min<int64_t>(geo.batch, kMaxColumnFloats / per_image));
  }

  std::vector<int32_t> strides_, pads_, dilations_;
  int groups_;
  bool has_mask_;
};

#define KD_REQUIRE_LAUNCH(ctx, ok) \
  OP_REQUIRES(ctx, ok, tensorflow::errors::Internal("deform_conv2d: kernel launch failed"))

template <typename Backend>
class DeformConv2DOp : public DeformConvBase {
 public:
  using DeformConvBase::DeformConvBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry geo;
    if (!MakeGeometry(ctx, &geo)) return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({geo.batch, geo.out_height,
                                                             geo.out_width, geo.out_channels}),
                                             &output));
    float* out = output->flat<float>().data();
    if (output->NumElements() == 0) return;
    if (geo.col_width() == 0) {  // no input channels: the sum is empty
      KD_REQUIRE_LAUNCH(ctx, Backend::Zero(ctx, out, output->NumElements()));
      return;
    }
    const int64_t chunk = ChunkImages(geo), P = geo.positions();
    Tensor columns;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                           TensorShape({chunk * P, geo.col_width()}), &columns));
    const float* input = ctx->input(0).flat<float>().data();
    const float* offset = ctx->input(1).flat<float>().data();
    const float* mask = ctx->input(2).flat<float>().data();
    const float* kernel = ctx->input(3).flat<float>().data();
    float* col = columns.flat<float>().data();
    for (int64_t n0 = 0; n0 < geo.batch; n0 += chunk) {
      const int64_t rows = std::min<int64_t>(chunk, geo.batch - n0) * P;
      KD_REQUIRE_LAUNCH(ctx, Backend::Im2Col(ctx, geo, input, offset, mask, n0 * P, rows, col));
      KD_REQUIRE_LAUNCH(ctx, Backend::Gemm(ctx, false, false, rows, geo.out_channels,
                                           geo.col_width(), col, kernel,
                                           out + n0 * P * geo.out_channels, false));
    }
  }
};

template <typename Backend>
class DeformConv2DGradOp : public DeformConvBase {
 public:
  using DeformConvBase::DeformConvBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry geo;
    if (!MakeGeometry(ctx, &geo)) return;
    const Tensor& grad_output = ctx->input(4);
    const TensorShape want({geo.batch, geo.out_height, geo.out_width, geo.out_channels});
    OP_REQUIRES(ctx, grad_output.shape() == want,
                InvalidArgument("deform_conv2d gradient: grad_output must have shape ",
                                want.DebugString(), ", got ", grad_output.shape().DebugString()));
    Tensor *grad_input, *grad_offset, *grad_mask, *grad_kernel;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &grad_input));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &grad_offset));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &grad_mask));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, ctx->input(3).shape(), &grad_kernel));
    float* gi = grad_input->flat<float>().data();
    float* go = grad_offset->flat<float>().data();
    float* gm = grad_mask->flat<float>().data();
    float* gk = grad_kernel->flat<float>().data();
    // Everything is zeroed first: the scatter and the kernel product accumulate, and empty
    // problems (no positions, no channels, no mask) must still give well-defined zeros.
    for (Tensor* t : {grad_input, grad_offset, grad_mask, grad_kernel}) {
      if (t->NumElements() > 0)
        KD_REQUIRE_LAUNCH(ctx, Backend::Zero(ctx, t->flat<float>().data(), t->NumElements()));
    }
    const int64_t P = geo.positions();
    if (geo.batch == 0 || P == 0 || geo.col_width() == 0 || geo.out_channels == 0) return;

    const int64_t chunk = ChunkImages(geo);
    Tensor columns;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                           TensorShape({chunk * P, geo.col_width()}), &columns));
    const float* input = ctx->input(0).flat<float>().data();
    const float* offset = ctx->input(1).flat<float>().data();
    const float* mask = ctx->input(2).flat<float>().data();
    const float* kernel = ctx->input(3).flat<float>().data();
    const float* gout = grad_output.flat<float>().data();
    float* col = columns.flat<float>().data();
    for (int64_t n0 = 0; n0 < geo.batch; n0 += chunk) {
      const int64_t rows = std::min<int64_t>(chunk, geo.batch - n0) * P;
      const float* gout_chunk = gout + n0 * P * geo.out_channels;
      KD_REQUIRE_LAUNCH(ctx, Backend::Im2Col(ctx, geo, input, offset, mask, n0 * P, rows, col));
      // grad_kernel [K * C, C_out] += columns^T x grad_output.
      KD_REQUIRE_LAUNCH(ctx, Backend::Gemm(ctx, true, false, geo.col_width(), geo.out_channels,
                                           rows, col, gout_chunk, gk, true));
      // grad_columns [rows, K * C] = grad_output x kernel^T, over the columns no longer needed.
      KD_REQUIRE_LAUNCH(ctx, Backend::Gemm(ctx, false, true, rows, geo.col_width(),
                                           geo.out_channels, gout_chunk, kernel, col, false));
      KD_REQUIRE_LAUNCH(ctx, Backend::Col2ImAndCoordinateGrad(ctx, geo, input, offset, mask, col,
                                                              n0 * P, rows, gi, go, gm));
    }
  }
};

}  // namespace
}  // namespace deform_conv
}  // namespace kerasdet

REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformConv2D").Device(tensorflow::DEVICE_CPU),
                        kerasdet::deform_conv::DeformConv2DOp<kerasdet::deform_conv::CpuBackend>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformConv2DGrad").Device(tensorflow::DEVICE_CPU),
                        kerasdet::deform_conv::DeformConv2DGradOp<kerasdet::deform_conv::CpuBackend>);

#if GOOGLE_CUDA
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformConv2D").Device(tensorflow::DEVICE_GPU),
                        kerasdet::deform_conv::DeformConv2DOp<kerasdet::deform_conv::GpuBackend>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>DeformConv2DGrad").Device(tensorflow::DEVICE_GPU),
                        kerasdet::deform_conv::DeformConv2DGradOp<kerasdet::deform_conv::GpuBackend>);
#endif  // GOOGLE_CUDA
