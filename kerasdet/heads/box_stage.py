"""A box stage of a region-based detector: RoI features -> class logits and box deltas, its
training loss, and the boxes it hands to the next stage (Cascade R-CNN chains several)."""
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet import ops
from kerasdet.heads.box_outputs import box_head_losses
from kerasdet.heads.cascade import refine_boxes, scale_gradient

__all__ = ["BoxStage", "roi_wise", "per_roi_losses", "select_hard_examples"]


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
        return self.predictor(hidden, training=training)

    def __call__(self, features, rois, training=False):
        return self.predict(self.pool(features, rois), training)

    def losses(self, logits, deltas, targets):
        """Fast R-CNN's multi-task loss on labelled RoIs (`sample_rois` / `relabel_rois` dict)."""
        cls, box = box_head_losses(logits, deltas, targets, weights=self.box_weights)
        return dict(zip(self.loss_names, (self.loss_weight * cls, self.loss_weight * box)))

    def hard_examples(self, features, labelled, count, nms_iou=None, training=False):
        """Online hard example mining: this stage's loss on every labelled RoI (`label_rois`),
        computed without gradient (the OHEM paper's read-only RoI network), and the `count`
        hardest RoIs per image (`select_hard_examples`); the training pass then runs the stage
        again on those only, so only they send gradients."""
        logits, deltas = self(features, labelled["rois"], training)
        losses = tf.stop_gradient(per_roi_losses(logits, deltas, labelled, self.box_weights))
        return select_hard_examples(losses, labelled, count, nms_iou)

    def refine(self, deltas, rois, image_shapes):
        """(boxes, nonempty): this stage's regression of `rois`, the next stage's input."""
        return refine_boxes(deltas, rois, image_shapes, self.box_weights)


def per_roi_losses(logits, deltas, targets, weights=(10.0, 10.0, 5.0, 5.0), beta=1.0):
    """[B, R] float32: each RoI's Fast R-CNN loss, the softmax cross entropy plus, for foreground,
    the smooth L1 of its class's deltas (`box_head_losses` before averaging); 0 for label -1."""
    labels = targets["labels"]
    box_targets = ops.encode_boxes(targets["matched_boxes"], targets["rois"], weights=weights)
    deltas = tf.cast(deltas, tf.float32)
    deltas = deltas[:, :, 0, :] if deltas.shape[2] == 1 else \
        kd_losses.select_class_boxes(deltas, labels - 1)
    box = tf.reduce_sum(kd_losses.smooth_l1(deltas - box_targets, beta), axis=-1)
    cls = kd_losses.softmax_cross_entropy(labels, tf.cast(logits, tf.float32))
    return cls + tf.where(labels >= 1, box, 0.0)


def select_hard_examples(losses, targets, count, nms_iou=None):
    """The `count` RoIs of highest loss per image, as a labelled-RoI dict of S = count slots
    (fewer usable RoIs: the rest have label -1).

    Args:
        losses: [B, R] per-RoI losses (>= 0); targets: labelled RoIs (`label_rois`), label -1
            never selected.
        nms_iou: None ranks by loss alone (R-FCN's reference code); a threshold (0.7 in the OHEM
            paper) runs greedy NMS on the RoIs scored by their loss first, so a RoI overlapping a
            harder selected one by more than it is skipped.
    """
    count = int(count)
    usable = targets["labels"] >= 0
    scores = tf.where(usable, tf.cast(losses, tf.float32), -1.0)
    if nms_iou is None:
        # `count` padding rows of score -1 make top_k defined when R < count.
        padded = tf.pad(scores, [[0, 0], [0, count]], constant_values=-1.0)
        top_scores, indices = tf.math.top_k(padded, k=count)
        selected = top_scores >= 0.0
        indices = tf.where(selected, indices, 0)
    else:
        kept = ops.batched_nms_padded(targets["rois"], scores, tf.zeros_like(targets["labels"]),
                                      float(nms_iou), count, score_threshold=-0.5)["indices"]
        selected = kept >= 0
        indices = tf.maximum(kept, 0)
    out = {key: tf.gather(value, indices, batch_dims=1) for key, value in targets.items()}
    out["labels"] = tf.where(selected, out["labels"], -1)
    return out
