// Op registrations of the Winograd F(m x m, 3 x 3) tile transforms (Lavin & Gray, "Fast Algorithms
// for Convolutional Neural Networks", 2016). A stride-1 3x3 convolution becomes
//     Y = OutputTransform( batched-matmul( InputTransform(X), U ) ),   U = G g G^T,
// with the (m + 2)^2 independent matrix products left to TensorFlow's MatMul (oneDNN), which runs
// them at the machine's GEMM rate. The four ops here are the memory-bound transforms and their
// adjoints (all four are linear), so the gradient of the whole convolution is again transforms
// around matrix products. CPU only: on a GPU cuDNN chooses its own convolution algorithms.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace kerasdet {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

absl::Status InputTransformShape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  int tile;
  TF_RETURN_IF_ERROR(c->GetAttr("tile", &tile));
  const int r = tile + 2;
  DimensionHandle tiles = c->UnknownDim();
  if (c->ValueKnown(c->Dim(x, 0)) && c->ValueKnown(c->Dim(x, 1)) && c->ValueKnown(c->Dim(x, 2))) {
    int pt, pb, pl, pr;
    TF_RETURN_IF_ERROR(c->GetAttr("pad_top", &pt));
    TF_RETURN_IF_ERROR(c->GetAttr("pad_bottom", &pb));
    TF_RETURN_IF_ERROR(c->GetAttr("pad_left", &pl));
    TF_RETURN_IF_ERROR(c->GetAttr("pad_right", &pr));
    const int64_t oh = c->Value(c->Dim(x, 1)) + pt + pb - 2;
    const int64_t ow = c->Value(c->Dim(x, 2)) + pl + pr - 2;
    if (oh > 0 && ow > 0) {
      tiles = c->MakeDim(c->Value(c->Dim(x, 0)) * ((oh + tile - 1) / tile) *
                         ((ow + tile - 1) / tile));
    }
  }
  c->set_output(0, c->MakeShape({c->MakeDim(r * r), tiles, c->Dim(x, 3)}));
  return absl::OkStatus();
}

absl::Status ShapeFromTensor(InferenceContext* c, int shape_input, int rank, DimensionHandle channels) {
  ShapeHandle s;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(shape_input, &s));
  TF_RETURN_IF_ERROR(c->WithRank(s, rank, &s));
  if (rank == 3) TF_RETURN_IF_ERROR(c->Concatenate(s, c->Vector(channels), &s));
  c->set_output(0, s);
  return absl::OkStatus();
}

absl::Status InputTransformGradShape(InferenceContext* c) {
  ShapeHandle g;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &g));
  return ShapeFromTensor(c, 1, 4, c->UnknownDim());
}

absl::Status OutputTransformShape(InferenceContext* c) {
  ShapeHandle m;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &m));
  return ShapeFromTensor(c, 1, 3, c->Dim(m, 2));
}

absl::Status OutputTransformGradShape(InferenceContext* c) {
  ShapeHandle y;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &y));
  int tile;
  TF_RETURN_IF_ERROR(c->GetAttr("tile", &tile));
  DimensionHandle tiles = c->UnknownDim();
  if (c->ValueKnown(c->Dim(y, 0)) && c->ValueKnown(c->Dim(y, 1)) && c->ValueKnown(c->Dim(y, 2))) {
    tiles = c->MakeDim(c->Value(c->Dim(y, 0)) * ((c->Value(c->Dim(y, 1)) + tile - 1) / tile) *
                       ((c->Value(c->Dim(y, 2)) + tile - 1) / tile));
  }
  c->set_output(0, c->MakeShape({c->MakeDim((tile + 2) * (tile + 2)), tiles, c->Dim(y, 3)}));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kerasdet

#define KD_WINOGRAD_ATTRS                  \
  Attr("T: {float, bfloat16, half}")       \
      .Attr("tile: int")                \
      .Attr("pad_top: int >= 0 = 1")       \
      .Attr("pad_bottom: int >= 0 = 1")    \
      .Attr("pad_left: int >= 0 = 1")      \
      .Attr("pad_right: int >= 0 = 1")

REGISTER_OP("KerasDet>WinogradInputTransform")
    .Input("input: T")
    .Output("output: T")
    .KD_WINOGRAD_ATTRS
    .SetShapeFn(kerasdet::InputTransformShape)
    .Doc("NHWC input [N, H, W, C] -> tiles [(tile + 2)^2, N * th * tw, C]: B^T d B of every "
         "(tile + 2)^2 input window at stride `tile` (zero padding by the pad_* attributes; the "
         "3x3 convolution's output is (H + pad_top + pad_bottom - 2) x (W + ...), th x tw tiles).");

REGISTER_OP("KerasDet>WinogradInputTransformGrad")
    .Input("grad: T")
    .Input("input_shape: int32")
    .Output("output: T")
    .KD_WINOGRAD_ATTRS
    .SetShapeFn(kerasdet::InputTransformGradShape)
    .Doc("Adjoint of WinogradInputTransform: B t B^T of every tile, summed into the overlapping "
         "input windows.");

REGISTER_OP("KerasDet>WinogradOutputTransform")
    .Input("input: T")
    .Input("output_size: int32")
    .Input("bias: T")
    .Output("output: T")
    .Attr("T: {float, bfloat16, half}")
    .Attr("tile: int")
    .Attr("relu: bool = false")
    .SetShapeFn(kerasdet::OutputTransformShape)
    .Doc("Tiles [(tile + 2)^2, N * th * tw, K] -> NHWC [N, OH, OW, K] (output_size = [N, OH, OW]): "
         "A^T m A of every tile, cropped at the output's edge, plus bias ([K], or [0] for none), "
         "clamped at 0 when relu is set.");

REGISTER_OP("KerasDet>WinogradOutputTransformGrad")
    .Input("grad: T")
    .Output("output: T")
    .Attr("T: {float, bfloat16, half}")
    .Attr("tile: int")
    .SetShapeFn(kerasdet::OutputTransformGradShape)
    .Doc("Adjoint of WinogradOutputTransform: A g A^T of every zero-extended output tile.");
