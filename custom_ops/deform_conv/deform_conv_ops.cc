// Op registrations of the deformable convolution (definition in deform_conv_core.h).
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace kerasdet {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// Output [B, H_out, W_out, C_out]: batch from input, spatial size from offset, C_out from kernel.
absl::Status ForwardShape(InferenceContext* c) {
  ShapeHandle input, offset, kernel;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &input));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &offset));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 4, &kernel));
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(input, 0), c->Dim(offset, 0), &batch));
  c->set_output(0, c->MakeShape({batch, c->Dim(offset, 1), c->Dim(offset, 2), c->Dim(kernel, 3)}));
  return absl::OkStatus();
}

absl::Status GradShape(InferenceContext* c) {
  for (int k = 0; k < 4; ++k) c->set_output(k, c->input(k));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kerasdet

REGISTER_OP("KerasDet>DeformConv2D")
    .Input("input: float")
    .Input("offset: float")
    .Input("mask: float")
    .Input("kernel: float")
    .Output("output: float")
    .Attr("strides: list(int) = [1, 1]")
    .Attr("pads: list(int) = [0, 0]")
    .Attr("dilations: list(int) = [1, 1]")
    .Attr("deformable_groups: int = 1")
    .Attr("has_mask: bool = false")
    .SetShapeFn(kerasdet::ForwardShape)
    .Doc(R"doc(
Deformable convolution (DCN v1; v2 when has_mask), NHWC, no bias.
input [B, H, W, C_in]; offset [B, H_out, W_out, 2 * G * kh * kw] with (dy, dx) of group g and tap
t = u * kw + v at channels 2 * (g * kh * kw + t) and +1; mask [B, H_out, W_out, G * kh * kw] (any
tensor, e.g. [0], when has_mask is false); kernel [kh, kw, C_in, C_out]. strides, pads (symmetric
zero padding) and dilations are (h, w) pairs. Bilinear sampling; grid points outside the map read 0.
)doc");

REGISTER_OP("KerasDet>DeformConv2DGrad")
    .Input("input: float")
    .Input("offset: float")
    .Input("mask: float")
    .Input("kernel: float")
    .Input("grad_output: float")
    .Output("grad_input: float")
    .Output("grad_offset: float")
    .Output("grad_mask: float")
    .Output("grad_kernel: float")
    .Attr("strides: list(int) = [1, 1]")
    .Attr("pads: list(int) = [0, 0]")
    .Attr("dilations: list(int) = [1, 1]")
    .Attr("deformable_groups: int = 1")
    .Attr("has_mask: bool = false")
    .SetShapeFn(kerasdet::GradShape)
    .Doc("Gradients of KerasDet>DeformConv2D w.r.t. input, offset, mask (zeros-shaped like mask "
         "when has_mask is false) and kernel.");
