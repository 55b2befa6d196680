// Op registrations of the integer-bin RoI family (see roi_pool_core.h for the definition).
#if GOOGLE_CUDA
#define EIGEN_USE_GPU  // common/roi_inputs.h reaches the GPU device in the GPU build
#endif

#include "common/roi_inputs.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace kerasdet {
namespace {

using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

absl::Status RoIPoolShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(PooledShape(c, false));
  c->set_output(1, c->output(0));  // argmax
  return absl::OkStatus();
}

absl::Status PSRoIPoolShape(InferenceContext* c) { return PooledShape(c, true); }

absl::Status GradFromShapeTensor(InferenceContext* c) {
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(3, &out));
  TF_RETURN_IF_ERROR(c->WithRank(out, 4, &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

}  // namespace
}  // namespace kerasdet

REGISTER_OP("KerasDet>RoIPool")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Output("output: float")
    .Output("argmax: int32")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .SetShapeFn(kerasdet::RoIPoolShape)
    .Doc("Fast R-CNN RoI max pooling, NHWC; argmax = h * W + w of each maximum (-1: empty bin).");

REGISTER_OP("KerasDet>RoIPoolGrad")
    .Input("grad: float")
    .Input("argmax: int32")
    .Input("box_indices: int32")
    .Input("features_shape: int32")
    .Output("grad_features: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .SetShapeFn(kerasdet::GradFromShapeTensor);

REGISTER_OP("KerasDet>PSRoIPool")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Output("output: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("bin_rule: {'rfcn', 'torchvision'} = 'rfcn'")
    .SetShapeFn(kerasdet::PSRoIPoolShape)
    .Doc("R-FCN position-sensitive RoI pooling (average voting), NHWC. bin_rule: the pixel "
         "bins of R-FCN's Caffe layer (rfcn) or of torchvision.ops.ps_roi_pool (torchvision).");

REGISTER_OP("KerasDet>PSRoIPoolGrad")
    .Input("grad: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Input("features_shape: int32")
    .Output("grad_features: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("bin_rule: {'rfcn', 'torchvision'} = 'rfcn'")
    .SetShapeFn(kerasdet::GradFromShapeTensor);
