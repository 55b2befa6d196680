"""Targets, losses and test-time decoding for the outputs of a second-stage box predictor."""
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet import ops
from kerasdet.heads.part_config import part_config

__all__ = ["OutputConfig", "box_head_losses", "decode_detections"]


@part_config(attribute="output_config")
class OutputConfig:
    """The box outputs: box-coder weights, one box per RoI (`class_agnostic`) or one per class,
    and the test-time post-processing (score threshold, per-class NMS IoU, detections kept)."""
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    class_agnostic: bool = False
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100

    def detections(self, class_probs, deltas, rois, roi_valid, image_shapes, weights=None):
        """`decode_detections` with these settings (`weights`: a stage's own coder weights)."""
        return decode_detections(class_probs, tf.cast(deltas, tf.float32), rois, roi_valid,
                                 image_shapes, weights=weights or self.box_weights,
                                 score_threshold=self.score_threshold, nms_iou=self.nms_iou,
                                 max_detections=self.max_detections)


def box_head_losses(logits, deltas, sampled, weights=(10.0, 10.0, 5.0, 5.0), beta=1.0):
    """Fast R-CNN multi-task loss (eq. 1, lambda = 1) of a box predictor on sampled RoIs.

    Args:
        logits [B, R, K + 1]; deltas [B, R, K or 1, 4];
        sampled: dict from sample_rois (rois, labels with -1 for unused slots, matched_boxes).

    Returns (classification loss, box loss), both averaged over the sampled RoIs.
    """
    targets = tf.stop_gradient(ops.encode_boxes(sampled["matched_boxes"], sampled["rois"],
                                                weights=weights))
    if deltas.shape[2] == 1:  # class-agnostic
        deltas = deltas[:, :, 0, :]
    out = kd_losses.fast_rcnn_loss(sampled["labels"], logits, targets, deltas, beta=beta)
    return out["classification"], out["box"]


def decode_detections(class_probs, deltas, rois, roi_valid, image_shapes,
                      weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05, nms_iou=0.5,
                      max_detections=100, max_per_class=None):
    """Test-time output: decode every class's box, clip, per-class NMS, keep the top
    `max_detections` per image (Fast R-CNN section 4 / the reference implementations).

    Args:
        class_probs [B, R, K + 1] softmax probabilities (column 0 = background);
        deltas [B, R, K or 1, 4]; rois [B, R, 4]; roi_valid bool [B, R]; image_shapes [B, 2].

    Returns the predict dict: boxes [B, M, 4], scores [B, M], classes int32 [B, M] (0-based, -1 in
    empty slots), num_detections int32 [B].
    """
    num_classes = class_probs.shape[-1] - 1
    boxes = ops.decode_boxes(deltas, rois[:, :, tf.newaxis, :], weights=weights)
    boxes = ops.clip_boxes(boxes, image_shapes[:, tf.newaxis, :])
    scores = class_probs[:, :, 1:] * tf.cast(roi_valid, class_probs.dtype)[..., tf.newaxis]
    if boxes.shape[2] == 1 and num_classes > 1:
        boxes = tf.tile(boxes, [1, 1, num_classes, 1])
    return ops.multiclass_nms(boxes, scores, max_per_class=max_per_class or max_detections,
                              max_detections=max_detections, iou_threshold=nms_iou,
                              score_threshold=score_threshold)
