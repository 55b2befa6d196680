// Input validation shared by the RoI op kernels (CPU and GPU registrations; compiled by g++ only).
//
// Every message names the argument of the public Python function (features, boxes, box_indices,
// offsets), so a user sees which input is wrong without reading kernel code.
#ifndef KERASDET_COMMON_ROI_INPUTS_H_
#define KERASDET_COMMON_ROI_INPUTS_H_

#include <cmath>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"

#if GOOGLE_CUDA && !defined(EIGEN_USE_GPU)
#error "define EIGEN_USE_GPU before the first include of a file with GPU kernels"
#endif

namespace kerasdet {

// TensorFlow's CUDA stream (a cudaStream_t) for the raw-pointer launchers of the .cu.cc files.
#if GOOGLE_CUDA
inline void* GpuStream(tensorflow::OpKernelContext* ctx) {
  return ctx->eigen_device<Eigen::GpuDevice>().stream();
}
#else
inline void* GpuStream(tensorflow::OpKernelContext*) { return nullptr; }  // CPU build: unused
#endif

// Checks features [B, H, W, C], boxes [R, 4], box_indices [R]; when check_values (CPU: the data is
// in host memory) also that the boxes are finite and every box index is in [0, B).
// On failure the context's status is set; callers return when !ctx->status().ok().
inline void ValidateRoIInputs(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& features,
                              const tensorflow::Tensor& boxes,
                              const tensorflow::Tensor& box_indices, bool check_values) {
  using tensorflow::errors::InvalidArgument;
  OP_REQUIRES(ctx, features.dims() == 4,
              InvalidArgument("features must be a rank-4 NHWC tensor [B, H, W, C], got shape ",
                              features.shape().DebugString()));
  OP_REQUIRES(ctx, boxes.dims() == 2 && boxes.dim_size(1) == 4,
              InvalidArgument("boxes must be [R, 4] (x1, y1, x2, y2), got shape ",
                              boxes.shape().DebugString()));
  OP_REQUIRES(ctx, box_indices.dims() == 1 && box_indices.dim_size(0) == boxes.dim_size(0),
              InvalidArgument("box_indices must be [R] with R = ", boxes.dim_size(0),
                              " (one batch index per box), got shape ",
                              box_indices.shape().DebugString()));
  OP_REQUIRES(ctx, features.NumElements() < (int64_t{1} << 31) && boxes.dim_size(0) < (1 << 30),
              InvalidArgument("features has ", features.NumElements(),
                              " elements; the kernels index with 32-bit integers"));
  if (!check_values) return;
  const int64_t batch = features.dim_size(0);
  const auto idx = box_indices.flat<int32_t>();
  for (int64_t r = 0; r < idx.size(); ++r) {
    OP_REQUIRES(ctx, idx(r) >= 0 && idx(r) < batch,
                InvalidArgument("box_indices[", r, "] = ", idx(r),
                                " is out of range: features has batch size ", batch));
  }
  const auto b = boxes.flat<float>();
  for (int64_t k = 0; k < b.size(); ++k) {
    OP_REQUIRES(ctx, std::isfinite(b(k)),
                InvalidArgument("boxes[", k / 4, "] has a non-finite coordinate (", b(k), ")"));
  }
}

// A positive pooled size attribute.
inline void ReadPooledSize(tensorflow::OpKernelConstruction* ctx, int* ph, int* pw) {
  OP_REQUIRES_OK(ctx, ctx->GetAttr("pooled_height", ph));
  OP_REQUIRES_OK(ctx, ctx->GetAttr("pooled_width", pw));
  OP_REQUIRES(ctx, *ph > 0 && *pw > 0,
              tensorflow::errors::InvalidArgument("output_size must be positive, got (", *ph, ", ",
                                                  *pw, ")"));
}

// Shape function of a pooling op: [R, ph, pw, C / (ph * pw) or C]; the divisibility of the
// channels by ph * pw is checked here when the channel count is known at graph-build time.
inline absl::Status PooledShape(tensorflow::shape_inference::InferenceContext* c,
                                bool position_sensitive) {
  using tensorflow::shape_inference::DimensionHandle;
  using tensorflow::shape_inference::ShapeHandle;
  ShapeHandle features, boxes, box_indices;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &features));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &boxes));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &box_indices));
  DimensionHandle four;
  TF_RETURN_IF_ERROR(c->WithValue(c->Dim(boxes, 1), 4, &four));
  DimensionHandle num_rois;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(boxes, 0), c->Dim(box_indices, 0), &num_rois));
  int ph, pw;
  TF_RETURN_IF_ERROR(c->GetAttr("pooled_height", &ph));
  TF_RETURN_IF_ERROR(c->GetAttr("pooled_width", &pw));
  DimensionHandle channels = c->Dim(features, 3);
  if (position_sensitive) {
    TF_RETURN_IF_ERROR(c->Divide(channels, static_cast<int64_t>(ph) * pw,
                                 /*evenly_divisible=*/true, &channels));
  }
  c->set_output(0, c->MakeShape({num_rois, ph, pw, channels}));
  return absl::OkStatus();
}

}  // namespace kerasdet

#endif  // KERASDET_COMMON_ROI_INPUTS_H_
