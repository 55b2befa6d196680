// Op registrations of the bilinear RoI family (see roi_align_core.h for the shared definition).
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

absl::Status PlainShape(InferenceContext* c) { return PooledShape(c, false); }
absl::Status PSShape(InferenceContext* c) { return PooledShape(c, true); }

// Gradient w.r.t. the features: shaped like the features (given by shape for the non-deformable
// ops, whose gradient needs no feature values).
absl::Status GradFromShapeTensor(InferenceContext* c) {
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(3, &out));
  TF_RETURN_IF_ERROR(c->WithRank(out, 4, &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

absl::Status DeformGradShape(InferenceContext* c) {
  c->set_output(0, c->input(1));  // grad_features like features
  c->set_output(1, c->input(4));  // grad_offsets like offsets
  return absl::OkStatus();
}

absl::Status DeformShape(InferenceContext* c, bool position_sensitive) {
  TF_RETURN_IF_ERROR(PooledShape(c, position_sensitive));
  ShapeHandle offsets;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 4, &offsets));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kerasdet

REGISTER_OP("KerasDet>RoIAlign")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Output("output: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .Attr("aligned: bool = true")
    .SetShapeFn(kerasdet::PlainShape)
    .Doc("Mask R-CNN RoIAlign, NHWC: bilinear samples averaged per bin.");

REGISTER_OP("KerasDet>RoIAlignGrad")
    .Input("grad: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Input("features_shape: int32")
    .Output("grad_features: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .Attr("aligned: bool = true")
    .SetShapeFn(kerasdet::GradFromShapeTensor);

REGISTER_OP("KerasDet>PSRoIAlign")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Output("output: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .SetShapeFn(kerasdet::PSShape)
    .Doc("Position-sensitive RoIAlign (R-FCN with bilinear samples, half-pixel shift).");

REGISTER_OP("KerasDet>PSRoIAlignGrad")
    .Input("grad: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Input("features_shape: int32")
    .Output("grad_features: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .SetShapeFn(kerasdet::GradFromShapeTensor);

REGISTER_OP("KerasDet>DeformRoIPool")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Input("offsets: float")
    .Output("output: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .Attr("aligned: bool = true")
    .Attr("gamma: float = 0.1")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      return kerasdet::DeformShape(c, false);
    })
    .Doc("Deformable RoI pooling (Deformable ConvNets): RoIAlign bins shifted by learned offsets.");

REGISTER_OP("KerasDet>DeformRoIPoolGrad")
    .Input("grad: float")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Input("offsets: float")
    .Output("grad_features: float")
    .Output("grad_offsets: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .Attr("aligned: bool = true")
    .Attr("gamma: float = 0.1")
    .SetShapeFn(kerasdet::DeformGradShape);

REGISTER_OP("KerasDet>DeformPSRoIPool")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Input("offsets: float")
    .Output("output: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .Attr("gamma: float = 0.1")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      return kerasdet::DeformShape(c, true);
    })
    .Doc("Deformable position-sensitive RoI pooling (Deformable ConvNets, R-FCN head).");

REGISTER_OP("KerasDet>DeformPSRoIPoolGrad")
    .Input("grad: float")
    .Input("features: float")
    .Input("boxes: float")
    .Input("box_indices: int32")
    .Input("offsets: float")
    .Output("grad_features: float")
    .Output("grad_offsets: float")
    .Attr("pooled_height: int")
    .Attr("pooled_width: int")
    .Attr("spatial_scale: float = 1.0")
    .Attr("sampling_ratio: int = 0")
    .Attr("gamma: float = 0.1")
    .SetShapeFn(kerasdet::DeformGradShape);
