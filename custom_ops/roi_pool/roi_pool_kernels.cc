// CPU kernels of RoIPool (max, with arg-max output) and PSRoIPool (average) and their gradients.
//
// Threading as in roi_align_kernels.cc: the forward pass splits the output bins over the CPU
// worker pool; the feature gradient (a scatter) is split over channel blocks, so each worker owns
// disjoint input channels and needs no atomics.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU  // for OpKernelContext::eigen_device<Eigen::GpuDevice>() (the CUDA stream)
#endif

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <string>

#include "common/cpu_parallel.h"
#include "common/roi_inputs.h"
#include "roi_pool/roi_pool_core.h"
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

void RoIPoolForward(const RoIPoolParams& p, const float* features, const float* boxes,
                    const int* box_indices, float* output, int* argmax, int64_t begin,
                    int64_t end) {
  const int bins = p.pooled_h * p.pooled_w;
  const int64_t image = static_cast<int64_t>(p.height) * p.width * p.channels;
  const int C = p.channels;
  for (int64_t u = begin; u < end; ++u) {
    const int r = static_cast<int>(u / bins);
    const int i = static_cast<int>((u % bins) / p.pooled_w), j = static_cast<int>(u % p.pooled_w);
    const PixelBin bin = roi_pool_bin(boxes + 4 * r, p, i, j);
    float* out = output + u * C;
    int* arg = argmax + u * C;
    const float* img = features + box_indices[r] * image;
    if (bin.h1 <= bin.h0 || bin.w1 <= bin.w0) {
      std::fill(out, out + C, 0.f);
      std::fill(arg, arg + C, -1);
      continue;
    }
    std::fill(out, out + C, -FLT_MAX);
    std::fill(arg, arg + C, -1);
    for (int h = bin.h0; h < bin.h1; ++h) {
      for (int w = bin.w0; w < bin.w1; ++w) {
        const int pixel = h * p.width + w;
        const float* v = img + static_cast<int64_t>(pixel) * C;
        for (int c = 0; c < C; ++c) {
          if (v[c] > out[c] || arg[c] < 0) {
            out[c] = v[c];
            arg[c] = pixel;
          }
        }
      }
    }
  }
}

void PSRoIPoolForward(const RoIPoolParams& p, const float* features, const float* boxes,
                      const int* box_indices, float* output, int64_t begin, int64_t end) {
  const int bins = p.pooled_h * p.pooled_w;
  const int64_t image = static_cast<int64_t>(p.height) * p.width * p.channels;
  for (int64_t u = begin; u < end; ++u) {
    const int r = static_cast<int>(u / bins);
    const int i = static_cast<int>((u % bins) / p.pooled_w), j = static_cast<int>(u % p.pooled_w);
    const PixelBin bin = roi_pool_bin(boxes + 4 * r, p, i, j);
    float* out = output + u * p.out_channels;
    std::fill(out, out + p.out_channels, 0.f);
    const int count = std::max(bin.h1 - bin.h0, 0) * std::max(bin.w1 - bin.w0, 0);
    if (count == 0) continue;
    // Output channel c reads input channel c * bins + (i * pw + j).
    const float* img = features + box_indices[r] * image + i * p.pooled_w + j;
    for (int h = bin.h0; h < bin.h1; ++h) {
      for (int w = bin.w0; w < bin.w1; ++w) {
        const float* v = img + (static_cast<int64_t>(h) * p.width + w) * p.channels;
        for (int c = 0; c < p.out_channels; ++c) out[c] += v[c * bins];
      }
    }
    const float inv = 1.f / static_cast<float>(count);
    for (int c = 0; c < p.out_channels; ++c) out[c] *= inv;
  }
}

// Gradients for output channels [c0, c1) of every RoI and bin.
void RoIPoolBackward(const RoIPoolParams& p, const float* grad, const int* box_indices,
                     const int* argmax, float* grad_features, int c0, int c1) {
  const int64_t image = static_cast<int64_t>(p.height) * p.width * p.channels;
  const int64_t units = static_cast<int64_t>(p.num_rois) * p.pooled_h * p.pooled_w;
  const int bins = p.pooled_h * p.pooled_w;
  for (int64_t u = 0; u < units; ++u) {
    float* img = grad_features + box_indices[u / bins] * image;
    const float* g = grad + u * p.channels;
    const int* arg = argmax + u * p.channels;
    for (int c = c0; c < c1; ++c) {
      if (arg[c] >= 0) img[static_cast<int64_t>(arg[c]) * p.channels + c] += g[c];
    }
  }
}

void PSRoIPoolBackward(const RoIPoolParams& p, const float* grad, const float* boxes,
                       const int* box_indices, float* grad_features, int c0, int c1) {
  const int64_t image = static_cast<int64_t>(p.height) * p.width * p.channels;
  const int bins = p.pooled_h * p.pooled_w;
  for (int r = 0; r < p.num_rois; ++r) {
    for (int i = 0; i < p.pooled_h; ++i) {
      for (int j = 0; j < p.pooled_w; ++j) {
        const PixelBin bin = roi_pool_bin(boxes + 4 * r, p, i, j);
        const int count = std::max(bin.h1 - bin.h0, 0) * std::max(bin.w1 - bin.w0, 0);
        if (count == 0) continue;
        const float inv = 1.f / static_cast<float>(count);
        const int64_t u = (static_cast<int64_t>(r) * p.pooled_h + i) * p.pooled_w + j;
        const float* g = grad + u * p.out_channels;
        float* img = grad_features + box_indices[r] * image + i * p.pooled_w + j;
        for (int h = bin.h0; h < bin.h1; ++h) {
          for (int w = bin.w0; w < bin.w1; ++w) {
            float* v = img + (static_cast<int64_t>(h) * p.width + w) * p.channels;
            for (int c = c0; c < c1; ++c) v[c * bins] += g[c] * inv;
          }
        }
      }
    }
  }
}

template <bool PS>
class RoIPoolFamilyBase : public OpKernel {
 public:
  explicit RoIPoolFamilyBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    ReadPooledSize(ctx, &pooled_h_, &pooled_w_);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("spatial_scale", &spatial_scale_));
    bin_rule_ = kFastRCNN;
    if (PS) {
      // The op registration restricts the attr to these two values.
      std::string rule;
      OP_REQUIRES_OK(ctx, ctx->GetAttr("bin_rule", &rule));
      bin_rule_ = rule == "torchvision" ? kTorchvision : kRFCN;
    }
  }

 protected:
  // False (with the context's status set) when the channels do not fit the pooled size.
  bool MakeParams(OpKernelContext* ctx, const TensorShape& features, int64_t num_rois,
                  RoIPoolParams* p) {
    p->batch = static_cast<int>(features.dim_size(0));
    p->height = static_cast<int>(features.dim_size(1));
    p->width = static_cast<int>(features.dim_size(2));
    p->channels = static_cast<int>(features.dim_size(3));
    p->num_rois = static_cast<int>(num_rois);
    p->pooled_h = pooled_h_;
    p->pooled_w = pooled_w_;
    p->spatial_scale = spatial_scale_;
    p->position_sensitive = PS;
    p->bin_rule = bin_rule_;
    p->out_channels = p->channels;
    if (PS) {
      const int bins = pooled_h_ * pooled_w_;
      if (p->channels % bins != 0) {
        ctx->CtxFailure(__FILE__, __LINE__,
                        InvalidArgument("features has ", p->channels,
                                        " channels, which is not divisible by output height * "
                                        "width = ", bins, " as position-sensitive pooling needs"));
        return false;
      }
      p->out_channels = p->channels / bins;
    }
    return true;
  }

  // Feature-gradient work split over channel blocks.
  template <typename Fn>
  void ShardChannels(OpKernelContext* ctx, const RoIPoolParams& p, Fn fn) {
    const int threads = CpuThreads(ctx);
    // One block of channels per thread: each block walks every RoI (see roi_align_kernels.cc).
    const int block = std::max(1, (p.out_channels + threads - 1) / std::max(1, threads));
    const int64_t units = (p.out_channels + block - 1) / block;
    const int64_t cost = static_cast<int64_t>(p.num_rois) * p.pooled_h * p.pooled_w * 20 * block;
    ShardOnCpu(ctx, units, cost, [&](int64_t begin, int64_t end) {
      fn(static_cast<int>(begin * block),
         static_cast<int>(std::min<int64_t>(end * block, p.out_channels)));
    });
  }

  // Reads features_shape (input `index`) and checks the gradient inputs; false on error.
  // box_indices: nullptr when its values are not in host memory (GPU).
  bool GradInputs(OpKernelContext* ctx, int index, const Tensor* box_indices,
                  TensorShape* features_shape) {
    const Tensor& shape = ctx->input(index);
    if (shape.dims() != 1 || shape.NumElements() != 4) {
      ctx->CtxFailure(__FILE__, __LINE__,
                      InvalidArgument("features_shape must be a 4-vector, got shape ",
                                      shape.shape().DebugString()));
      return false;
    }
    const auto dims = shape.vec<int32_t>();
    for (int k = 0; k < 4; ++k) {
      if (dims(k) < 0) {
        ctx->CtxFailure(__FILE__, __LINE__,
                        InvalidArgument("features_shape has a negative dimension"));
        return false;
      }
      features_shape->AddDim(dims(k));
    }
    if (box_indices == nullptr) return true;
    const auto idx = box_indices->flat<int32_t>();
    for (int64_t r = 0; r < idx.size(); ++r) {
      if (idx(r) < 0 || idx(r) >= dims(0)) {
        ctx->CtxFailure(__FILE__, __LINE__,
                        InvalidArgument("box_indices[", r, "] = ", idx(r),
                                        " is out of range: features has batch size ", dims(0)));
        return false;
      }
    }
    return true;
  }

  int pooled_h_, pooled_w_;
  float spatial_scale_;
  int bin_rule_;  // a BinRule
};

// Status of a CUDA launcher's return code.
inline void CheckLaunch(OpKernelContext* ctx, int err, const std::string& op) {
  OP_REQUIRES(ctx, err == 0, tensorflow::errors::Internal("CUDA error ", err, " in ", op));
}

// GPU = true: the same op on the GPU through roi_pool_gpu.cu.cc's launchers (GPU library only).
// Box index values live in device memory there and are not checked (such a box pools to 0).
template <bool GPU>
class RoIPoolOp : public RoIPoolFamilyBase<false> {
 public:
  explicit RoIPoolOp(OpKernelConstruction* ctx) : RoIPoolFamilyBase(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const Tensor& boxes = ctx->input(1);
    const Tensor& box_indices = ctx->input(2);
    ValidateRoIInputs(ctx, features, boxes, box_indices, /*check_values=*/!GPU);
    if (!ctx->status().ok()) return;
    RoIPoolParams p;
    if (!MakeParams(ctx, features.shape(), boxes.dim_size(0), &p)) return;
    const TensorShape out_shape({p.num_rois, p.pooled_h, p.pooled_w, p.channels});
    Tensor *output = nullptr, *argmax = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &output));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, out_shape, &argmax));
    if (output->NumElements() == 0) return;
    const float* f = features.flat<float>().data();
    const float* b = boxes.flat<float>().data();
    const int* bi = box_indices.flat<int32_t>().data();
    float* out = output->flat<float>().data();
    int* arg = argmax->flat<int32_t>().data();
    if constexpr (GPU) {
      CheckLaunch(ctx, LaunchRoIPoolForwardGPU(p, f, b, bi, out, arg, GpuStream(ctx)), name());
      return;
    }
    if (features.NumElements() == 0) {
      output->flat<float>().setZero();
      argmax->flat<int32_t>().setConstant(-1);
      return;
    }
    ShardOnCpu(ctx, static_cast<int64_t>(p.num_rois) * p.pooled_h * p.pooled_w, 40 * p.channels,
               [&](int64_t begin, int64_t end) { RoIPoolForward(p, f, b, bi, out, arg, begin, end); });
  }
};

template <bool GPU>
class RoIPoolGradOp : public RoIPoolFamilyBase<false> {
 public:
  explicit RoIPoolGradOp(OpKernelConstruction* ctx) : RoIPoolFamilyBase(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& argmax = ctx->input(1);
    const Tensor& box_indices = ctx->input(2);
    TensorShape features_shape;
    if (!GradInputs(ctx, 3, GPU ? nullptr : &box_indices, &features_shape)) return;
    RoIPoolParams p;
    if (!MakeParams(ctx, features_shape, box_indices.dim_size(0), &p)) return;
    const TensorShape out_shape({p.num_rois, p.pooled_h, p.pooled_w, p.channels});
    OP_REQUIRES(ctx, grad.shape() == out_shape && argmax.shape() == out_shape,
                InvalidArgument("grad and argmax must be shaped like the output ",
                                out_shape.DebugString()));
    Tensor* grad_features = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, features_shape, &grad_features));
    const float* g = grad.flat<float>().data();
    const int* arg = argmax.flat<int32_t>().data();
    const int* bi = box_indices.flat<int32_t>().data();
    float* gf = grad_features->flat<float>().data();
    if constexpr (GPU) {
      CheckLaunch(ctx, LaunchRoIPoolBackwardGPU(p, g, nullptr, bi, arg, gf, GpuStream(ctx)),
                  name());
      return;
    }
    grad_features->flat<float>().setZero();
    if (grad.NumElements() == 0 || grad_features->NumElements() == 0) return;
    const int64_t pixels = features_shape.dim_size(1) * features_shape.dim_size(2);
    for (int64_t k = 0; k < argmax.NumElements(); ++k) {
      OP_REQUIRES(ctx, arg[k] >= -1 && arg[k] < pixels,
                  InvalidArgument("argmax holds ", arg[k], ", not a pixel of the feature map"));
    }
    ShardChannels(ctx, p, [&](int c0, int c1) { RoIPoolBackward(p, g, bi, arg, gf, c0, c1); });
  }
};

template <bool GPU>
class PSRoIPoolOp : public RoIPoolFamilyBase<true> {
 public:
  explicit PSRoIPoolOp(OpKernelConstruction* ctx) : RoIPoolFamilyBase(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& features = ctx->input(0);
    const Tensor& boxes = ctx->input(1);
    const Tensor& box_indices = ctx->input(2);
    ValidateRoIInputs(ctx, features, boxes, box_indices, /*check_values=*/!GPU);
    if (!ctx->status().ok()) return;
    RoIPoolParams p;
    if (!MakeParams(ctx, features.shape(), boxes.dim_size(0), &p)) return;
    Tensor* output = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({p.num_rois, p.pooled_h, p.pooled_w, p.out_channels}),
                            &output));
    if (output->NumElements() == 0) return;
    const float* f = features.flat<float>().data();
    const float* b = boxes.flat<float>().data();
    const int* bi = box_indices.flat<int32_t>().data();
    float* out = output->flat<float>().data();
    if constexpr (GPU) {
      CheckLaunch(ctx, LaunchRoIPoolForwardGPU(p, f, b, bi, out, nullptr, GpuStream(ctx)), name());
      return;
    }
    if (features.NumElements() == 0) {
      output->flat<float>().setZero();
      return;
    }
    ShardOnCpu(ctx, static_cast<int64_t>(p.num_rois) * p.pooled_h * p.pooled_w, 40 * p.out_channels,
               [&](int64_t begin, int64_t end) { PSRoIPoolForward(p, f, b, bi, out, begin, end); });
  }
};

template <bool GPU>
class PSRoIPoolGradOp : public RoIPoolFamilyBase<true> {
 public:
  explicit PSRoIPoolGradOp(OpKernelConstruction* ctx) : RoIPoolFamilyBase(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& boxes = ctx->input(1);
    const Tensor& box_indices = ctx->input(2);
    OP_REQUIRES(ctx, boxes.dims() == 2 && boxes.dim_size(1) == 4 && box_indices.dims() == 1 &&
                         box_indices.dim_size(0) == boxes.dim_size(0),
                InvalidArgument("boxes must be [R, 4] and box_indices [R]"));
    TensorShape features_shape;
    if (!GradInputs(ctx, 3, GPU ? nullptr : &box_indices, &features_shape)) return;
    RoIPoolParams p;
    if (!MakeParams(ctx, features_shape, boxes.dim_size(0), &p)) return;
    OP_REQUIRES(ctx, grad.shape() == TensorShape({p.num_rois, p.pooled_h, p.pooled_w,
                                                  p.out_channels}),
                InvalidArgument("grad must be shaped like the op's output, got ",
                                grad.shape().DebugString()));
    Tensor* grad_features = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, features_shape, &grad_features));
    const float* g = grad.flat<float>().data();
    const float* b = boxes.flat<float>().data();
    const int* bi = box_indices.flat<int32_t>().data();
    float* gf = grad_features->flat<float>().data();
    if constexpr (GPU) {
      CheckLaunch(ctx, LaunchRoIPoolBackwardGPU(p, g, b, bi, nullptr, gf, GpuStream(ctx)), name());
      return;
    }
    grad_features->flat<float>().setZero();
    if (grad.NumElements() == 0 || grad_features->NumElements() == 0) return;
    ShardChannels(ctx, p, [&](int c0, int c1) { PSRoIPoolBackward(p, g, b, bi, gf, c0, c1); });
  }
};

using tensorflow::DEVICE_CPU;
REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIPool").Device(DEVICE_CPU), RoIPoolOp<false>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIPoolGrad").Device(DEVICE_CPU), RoIPoolGradOp<false>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIPool").Device(DEVICE_CPU), PSRoIPoolOp<false>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIPoolGrad").Device(DEVICE_CPU), PSRoIPoolGradOp<false>);

#if GOOGLE_CUDA
using tensorflow::DEVICE_GPU;
REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIPool").Device(DEVICE_GPU), RoIPoolOp<true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>RoIPoolGrad").Device(DEVICE_GPU)
                            .HostMemory("features_shape"),
                        RoIPoolGradOp<true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIPool").Device(DEVICE_GPU), PSRoIPoolOp<true>);
REGISTER_KERNEL_BUILDER(Name("KerasDet>PSRoIPoolGrad").Device(DEVICE_GPU)
                            .HostMemory("features_shape"),
                        PSRoIPoolGradOp<true>);
#endif  // GOOGLE_CUDA

}  // namespace
}  // namespace kerasdet
