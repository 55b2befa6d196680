"""Parts of the single-shot detectors (RefineDet, and SSD-style models after it): dense per-level
heads, matching ground truth to anchors (or to refined anchors), the negative-anchor filter, and
dense decoding + NMS.

Conventions (docs/ARCHITECTURE.md): anchors are location-major then anchor type, so a conv head's
[B, H, W, A * k] output reshaped to [B, H * W * A, k] lines up with `AnchorGenerator`'s anchors of
that level; the levels are concatenated shallowest first. Class heads have C + 1 logits, column 0
the background (head class = dataset class + 1).

Matching (SSD, Liu et al. 2016 sec. 2.2; RefineDet, Zhang et al. 2018 sec. 3 "Training and
Inference"): every ground truth is first matched to the anchor with its best IoU, then every other
anchor whose best IoU with some ground truth is >= the threshold (0.5) is matched to that ground
truth; all other anchors are negatives. A forced (best-anchor) match overrides the anchor's own
best ground truth, as in the reference code's bipartite step. Where two ground truths share one
best anchor, the first (lowest index) keeps it here, while the reference's greedy bipartite loop
would give the other one its next-best anchor; that case needs two objects whose best anchor is
the same box.
"""
import keras
import tensorflow as tf

from kerasdet.ops.boxes import box_iou, clip_boxes, encode_boxes, multiclass_nms, batched_nms_padded
from kerasdet.ops.matching import gather_by_match

__all__ = ["DenseHead", "match_to_anchors", "single_shot_targets", "negative_anchor_mask",
           "dense_detections"]


@keras.saving.register_keras_serializable(package="kerasdet")
class DenseHead(keras.layers.Layer):
    """One k x k conv per level (weights not shared between levels, as SSD / RefineDet), each with
    ``num_anchors * channels_per_anchor`` outputs; the outputs are flattened to
    [B, H_l * W_l * A, channels_per_anchor] and concatenated over the levels.

    Args:
        num_anchors: A, anchors per location (the same on every level).
        channels_per_anchor: 4 for box offsets, 2 for the ARM's object / not-object scores,
            C + 1 for class scores.
        num_levels: number of feature maps.
        kernel_size: 3 in SSD and RefineDet.
        kernel_initializer: "xavier" of the reference models (Keras' glorot_uniform).
        level_names: names of the convs (their weight paths); default "<name>_<level index>".
    """

    def __init__(self, num_anchors, channels_per_anchor, num_levels, kernel_size=3,
                 kernel_initializer="glorot_uniform", level_names=None, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.channels_per_anchor = int(channels_per_anchor)
        self.num_levels = int(num_levels)
        self.kernel_size = int(kernel_size)
        self.kernel_initializer = keras.initializers.serialize(
            keras.initializers.get(kernel_initializer))
        if self.num_anchors < 1 or self.channels_per_anchor < 1 or self.num_levels < 1:
            raise ValueError(f"DenseHead: need positive num_anchors, channels_per_anchor and "
                             f"num_levels, got {num_anchors}, {channels_per_anchor}, {num_levels}")
        names = list(level_names) if level_names is not None else [
            f"{self.name}_{i}" for i in range(self.num_levels)]
        if len(names) != self.num_levels:
            raise ValueError(f"DenseHead: {len(names)} level_names for {self.num_levels} levels")
        self.level_names = tuple(names)
        self.convs = [keras.layers.Conv2D(
            self.num_anchors * self.channels_per_anchor, self.kernel_size, padding="same",
            kernel_initializer=keras.initializers.get(self.kernel_initializer),
            dtype=self.dtype_policy, name=n) for n in self.level_names]

    def build(self, input_shape):
        for conv, shape in zip(self.convs, input_shape):
            conv.build(shape)
        self.built = True

    def call(self, features):
        if len(features) != self.num_levels:
            raise ValueError(f"DenseHead {self.name}: {len(features)} feature maps for "
                             f"{self.num_levels} levels")
        outputs = []
        for conv, x in zip(self.convs, features):
            y = conv(x)
            outputs.append(tf.reshape(y, [tf.shape(y)[0], -1, self.channels_per_anchor]))
        return tf.concat(outputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], None, self.channels_per_anchor)

    def get_config(self):
        config = super().get_config()
        config.update({"num_anchors": self.num_anchors,
                       "channels_per_anchor": self.channels_per_anchor,
                       "num_levels": self.num_levels, "kernel_size": self.kernel_size,
                       "kernel_initializer": self.kernel_initializer,
                       "level_names": list(self.level_names)})
        return config


def match_to_anchors(anchors, gt_boxes, gt_labels, iou_threshold=0.5):
    """SSD / RefineDet matching (module docstring).

    Args:
        anchors: [N, 4] shared by the batch, or [B, N, 4] per image (refined anchors).
        gt_boxes: [B, M, 4]; gt_labels: int [B, M] 0-based, -1 for padding.
        iou_threshold: the overlap that makes an anchor positive (0.5).

    Returns:
        (matched int32 [B, N] index of the matched ground truth (0 where unmatched),
         positive bool [B, N]).
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_labels = tf.cast(gt_labels, tf.int32)
    gt_valid = gt_labels >= 0  # [B, M]
    iou = box_iou(anchors, gt_boxes)  # [B, N, M]
    masked = tf.where(gt_valid[:, tf.newaxis, :], iou, -1.0)
    # A sentinel ground truth of IoU -1 keeps the reductions defined when M = 0.
    masked = tf.concat([masked, tf.fill(tf.concat([tf.shape(masked)[:-1], [1]], 0), -1.0)], axis=-1)
    num_gt = tf.shape(gt_labels)[1]
    best_iou = tf.reduce_max(masked, axis=-1)
    matched = tf.argmax(masked, axis=-1, output_type=tf.int32)
    positive = best_iou >= iou_threshold
    # Each valid ground truth's best anchor (an overlap > 0 is needed, as in the reference code).
    best_anchor = tf.argmax(masked, axis=1, output_type=tf.int32)  # [B, M + 1]
    best_anchor_iou = tf.reduce_max(masked, axis=1)
    forced_gt = tf.concat([gt_valid, tf.zeros([tf.shape(gt_valid)[0], 1], tf.bool)], axis=1) & (best_anchor_iou > 0)
    num_anchors = tf.shape(masked)[1]
    forced = (tf.range(num_anchors)[tf.newaxis, :, tf.newaxis] == best_anchor[:, tf.newaxis, :]) \
        & forced_gt[:, tf.newaxis, :]  # [B, N, M + 1]
    is_forced = tf.reduce_any(forced, axis=-1)
    matched = tf.where(is_forced, tf.argmax(tf.cast(forced, tf.int32), axis=-1,
                                            output_type=tf.int32), matched)
    positive = positive | is_forced
    matched = tf.where(positive, tf.minimum(matched, tf.maximum(num_gt - 1, 0)), 0)
    return matched, positive


def single_shot_targets(anchors, gt_boxes, gt_labels, box_weights, iou_threshold=0.5,
                        binary=False):
    """Class and box targets of anchors (or refined anchors) for a softmax dense head.

    Args:
        anchors: [N, 4] or [B, N, 4].
        gt_boxes, gt_labels: as `match_to_anchors`.
        box_weights: the coder's (wx, wy, ww, wh), 1 / variances: (10, 10, 5, 5).
        binary: class target 1 for every positive (the ARM's object / not-object head) instead of
            dataset class + 1.

    Returns:
        (class_targets int32 [B, N]: 0 background, head class for positives;
         box_targets float32 [B, N, 4], zeros where not positive;
         positive bool [B, N]).
    """
    matched, positive = match_to_anchors(anchors, gt_boxes, gt_labels, iou_threshold)
    labels = gather_by_match(tf.cast(gt_labels, tf.int32), matched)
    classes = tf.ones_like(labels) if binary else labels + 1
    class_targets = tf.where(positive, classes, 0)
    boxes = gather_by_match(tf.cast(gt_boxes, tf.float32), matched)
    anchors = tf.cast(anchors, tf.float32)
    if anchors.shape.rank == 2:
        anchors = anchors[tf.newaxis]
    targets = encode_boxes(boxes, anchors, box_weights)
    box_targets = tf.where(positive[..., tf.newaxis], targets, 0.0)
    return class_targets, box_targets, positive


def negative_anchor_mask(arm_logits, theta=0.99):
    """RefineDet's negative anchor filtering: bool [B, N], True where the ARM's not-object
    probability (softmax column 0 of its 2 logits) is above ``theta``, i.e. the object probability
    is below 1 - theta. Such anchors are dropped as ODM negatives in training and have their
    detections set to background at test time. ``theta`` None or >= 1 filters nothing."""
    arm_logits = tf.cast(arm_logits, tf.float32)
    if theta is None or theta >= 1.0:
        return tf.zeros(tf.shape(arm_logits)[:-1], tf.bool)
    return tf.nn.softmax(arm_logits, axis=-1)[..., 0] > float(theta)


def dense_detections(boxes, class_probs, image_shapes, filtered=None, max_detections=200,
                     pre_nms_top_k=400, nms_iou=0.45, score_threshold=0.01,
                     per_class_top_k=None):
    """Post-processing of a dense softmax head: the predict dict.

    Args:
        boxes: [B, N, 4] decoded boxes (network-input pixels); clipped here to each image.
        class_probs: [B, N, C + 1] softmax probabilities, column 0 background.
        image_shapes: [B, 2] valid (height, width) of each image.
        filtered: optional bool [B, N]; these anchors' detections are background (score 0).
        max_detections: K slots per image after NMS (200 in the paper; 500 in the reference code).
        pre_nms_top_k: (paper) the top ``pre_nms_top_k`` (box, class) scores per image over all
            classes go into NMS (400).
        nms_iou: per-class NMS threshold (0.45).
        score_threshold: scores <= this are dropped (0.01).
        per_class_top_k: (reference code) instead of the per-image top-k, the top
            ``per_class_top_k`` boxes of each class go into that class's NMS (1000).

    Returns:
        dict boxes [B, K, 4], scores [B, K], classes int32 [B, K] (0-based dataset ids, -1 in
        empty slots), num_detections int32 [B].
    """
    probs = tf.cast(class_probs, tf.float32)
    scores = probs[..., 1:]
    if filtered is not None:
        scores = tf.where(filtered[..., tf.newaxis], 0.0, scores)
    boxes = clip_boxes(tf.cast(boxes, tf.float32), tf.cast(image_shapes, tf.float32))
    if per_class_top_k is None:
        return multiclass_nms(boxes, scores, max_detections, nms_iou, score_threshold,
                              pre_nms_top_k=pre_nms_top_k)
    by_class = tf.transpose(scores, [0, 2, 1])  # [B, C, N]
    k = tf.minimum(int(per_class_top_k), tf.shape(by_class)[2])
    top_scores, top = tf.math.top_k(by_class, k=k)  # [B, C, k]
    top_boxes = tf.gather(boxes, top, batch_dims=1)  # [B, C, k, 4]
    batch = tf.shape(scores)[0]
    classes = tf.broadcast_to(tf.range(tf.shape(by_class)[1])[tf.newaxis, :, tf.newaxis],
                              tf.shape(top))
    # Class-aware NMS on the union of the per-class candidates is per-class NMS; the K best
    # survivors over all classes are kept (the reference code's keep_top_k).
    out = batched_nms_padded(tf.reshape(top_boxes, [batch, -1, 4]),
                             tf.reshape(top_scores, [batch, -1]),
                             tf.reshape(classes, [batch, -1]), nms_iou, max_detections,
                             score_threshold=score_threshold)
    out.pop("indices")
    return out
