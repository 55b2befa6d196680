"""A box stage of a region-based detector: RoI features -> class logits and box deltas, its
training loss, and the boxes it hands to the next stage (Cascade R-CNN chains several)."""
import tensorflow as tf

from kerasdet.heads.box_outputs import box_head_losses
from kerasdet.heads.cascade import refine_boxes, scale_gradient

__all__ = ["BoxStage", "roi_wise"]


def roi_wise(layer):
    """`layer` (made for images, e.g. the ResNet res5 stage) applied to each RoI of pooled
    features [B, R, S, S, C]: [B, R, ...] out."""
    def apply(pooled, training=False):
        shape = tf.shape(pooled)
        hidden = layer(tf.reshape(pooled, [-1, *pooled.shape[2:]]), training=training)
        return tf.reshape(hidden, [shape[0], shape[1], *hidden.shape[1:]])
    return apply


class BoxStage:
    """extractor(features, rois) -> pooled; head(pooled, training) -> hidden (optional);
    predictor(hidden) -> (logits [B, R, K + 1], deltas [B, R, K or 1, 4]).

    box_weights: the stage's box-coder weights; foreground_iou: the IoU its training RoIs are
    labelled at; loss_weight: factor on its losses, named `{loss_prefix}_cls` / `_box`;
    gradient_scale: factor on the gradient its pooled features send into the trunk (Cascade
    R-CNN's 1 / stages). Stages may share layers (Iterative BBox applies one stage T times).
    """

    def __init__(self, extractor, predictor, head=None, box_weights=(10.0, 10.0, 5.0, 5.0),
                 foreground_iou=0.5, loss_weight=1.0, gradient_scale=1.0, loss_prefix="roi"):
        self.extractor, self.head, self.predictor = extractor, head, predictor
        self.box_weights = tuple(float(w) for w in box_weights)
        self.foreground_iou = float(foreground_iou)
        self.loss_weight = float(loss_weight)
        self.gradient_scale = float(gradient_scale)
        self.loss_prefix = loss_prefix

    @property
    def loss_names(self):
        return (f"{self.loss_prefix}_cls", f"{self.loss_prefix}_box")

    def pool(self, features, rois):
        pooled = self.extractor(features, rois)
        if self.gradient_scale != 1.0:
            pooled = scale_gradient(pooled, self.gradient_scale)
        return pooled

    def predict(self, pooled, training=False):
        hidden = pooled if self.head is None else self.head(pooled, training=training)
        return self.predictor(hidden)

    def __call__(self, features, rois, training=False):
        return self.predict(self.pool(features, rois), training)

    def losses(self, logits, deltas, targets):
        """Fast R-CNN's multi-task loss on labelled RoIs (`sample_rois` / `relabel_rois` dict)."""
        cls, box = box_head_losses(logits, deltas, targets, weights=self.box_weights)
        return dict(zip(self.loss_names, (self.loss_weight * cls, self.loss_weight * box)))

    def refine(self, deltas, rois, image_shapes):
        """(boxes, nonempty): this stage's regression of `rois`, the next stage's input."""
        return refine_boxes(deltas, rois, image_shapes, self.box_weights)
