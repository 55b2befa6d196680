"""Cascade R-CNN stage parts (Cai & Vasconcelos 2018): relabeling, box refinement between stages,
gradient scaling into the shared trunk and the test-time score ensemble.

Stage t is trained on the boxes regressed by stage t - 1, labeled with its own (higher) IoU
threshold u_t: ``y^t = g_y if IoU(b^t, g) >= u_t else 0``. Following Detectron2's CascadeROIHeads,
later stages do NOT resample: every RoI of the first stage's sample (ground truth included) is
regressed and relabeled, so the quality distribution the stage sees is the one the cascade
produces. By default the ground-truth boxes are also appended again at every stage (Detectron2 only
carries the first stage's, regressed; MMDetection re-adds them at every stage's sampler), which
gives each stage some perfect positives even while the previous regressor is still poor.
"""
import tensorflow as tf

from kerasdet import ops
from kerasdet.heads.roi_sampler import label_rois

__all__ = [
    "scale_gradient",
    "relabel_rois",
    "refine_boxes",
    "mean_class_probabilities",
    "CASCADE_IOUS",
    "CASCADE_BOX_WEIGHTS",
]

#: The paper's three IoU thresholds u_t.
CASCADE_IOUS = (0.5, 0.6, 0.7)
#: Box-coder weights per stage: the regression targets shrink as the boxes improve, so each stage
#: normalizes them by a smaller standard deviation (1/10, 1/20, 1/30 for the centre terms).
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


def scale_gradient(x, scale):
    """Identity in the forward pass; multiplies the gradient by `scale` in the backward pass.

    Detectron2 scales the gradient of each stage's pooled features by 1 / num_stages, so the
    shared trunk receives the average rather than the sum of the stages' gradients.
    """
    scale = float(scale)

    @tf.custom_gradient
    def _identity(value):
        def grad(upstream):
            return upstream * tf.cast(scale, upstream.dtype)

        return tf.identity(value), grad

    return _identity(x)


def relabel_rois(rois, roi_valid, gt_boxes, gt_labels, iou_threshold, add_ground_truth=True,
                 gt_crowd=None, crowd_ioa_threshold=ops.CROWD_IOA_THRESHOLD):
    """Labels every RoI of a cascade stage at that stage's IoU threshold, without sampling.

    Args:
        rois: [B, R, 4] the previous stage's regressed boxes (constants); roi_valid: bool [B, R].
        gt_boxes: [B, N, 4]; gt_labels: int32 [B, N] 0-based, -1 for padding.
        iou_threshold: u_t; a RoI with best IoU >= u_t is foreground, below it background
            (background has no lower bound, as in Detectron2).
        add_ground_truth: append the ground-truth boxes to the RoIs (R' = R + N).
        gt_crowd: optional bool [B, N], the batch's ``iscrowd`` (the rule of
            kerasdet.ops.matching): crowd boxes are not matched against and their appended rows
            are invalid; a RoI that is not foreground with more than `crowd_ioa_threshold` of
            its area inside a crowd box gets label -1 (no loss) instead of background.

    Returns a dict shaped like `sample_rois`' output: rois [B, R', 4], labels int32 [B, R']
    (class + 1 for foreground, 0 for background, -1 for invalid RoIs), matched_boxes [B, R', 4],
    matched_index int32 [B, R'] and iou [B, R'] (best IoU with valid ground truth).
    """
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"`iou_threshold` must be in (0, 1], got {iou_threshold!r}.")
    rois = tf.cast(rois, tf.float32)
    if rois.shape.rank is not None and rois.shape.rank != 3:
        raise ValueError(f"`rois` must have shape [B, R, 4], got {rois.shape}.")
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    # Sampling's labelling with one band: foreground at u_t, background below it without a bound.
    return label_rois(rois, tf.cast(roi_valid, tf.bool), gt_boxes, gt_labels, foreground_iou=iou_threshold,
                      background_iou_low=0.0, add_ground_truth=add_ground_truth, gt_crowd=gt_crowd,
                      crowd_ioa_threshold=crowd_ioa_threshold)


def refine_boxes(deltas, rois, image_shapes, weights):
    """The boxes a stage hands to the next: its class-agnostic deltas applied to its RoIs, clipped
    to each image, with the gradient stopped (the paper's b^t = f_{t-1}(x^{t-1}, b^{t-1}) is an
    input of stage t, not something stage t's loss should move).

    Args:
        deltas: [B, R, 1, 4] or [B, R, 4] class-agnostic deltas; rois: [B, R, 4];
        image_shapes: [B, 2] valid (height, width); weights: the stage's box-coder weights.

    Returns:
        (boxes [B, R, 4], nonempty bool [B, R]): `nonempty` is False for boxes the clipping
        collapsed to zero width or height (Detectron2 drops those in training).
    """
    deltas = tf.cast(deltas, tf.float32)
    if deltas.shape.rank == 4:
        if deltas.shape[2] not in (1, None):
            raise ValueError("Cascade stages regress class-agnostic boxes: `deltas` must be "
                             f"[B, R, 1, 4] or [B, R, 4], got {deltas.shape}.")
        deltas = deltas[:, :, 0, :]
    boxes = ops.decode_boxes(deltas, tf.cast(rois, tf.float32), weights=weights)
    boxes = ops.clip_boxes(boxes, tf.cast(image_shapes, tf.float32))
    boxes = tf.stop_gradient(boxes)
    return boxes, ops.valid_boxes_mask(boxes)


def mean_class_probabilities(stage_logits):
    """Test-time ensemble: the mean over stages of the softmax class probabilities
    ([B, R, K + 1] each), all computed on the same (final-stage input) RoIs."""
    if not stage_logits:
        raise ValueError("`stage_logits` must hold at least one stage's logits.")
    probs = [tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1) for logits in stage_logits]
    return tf.add_n(probs) / float(len(probs))
