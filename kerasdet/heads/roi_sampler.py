"""Training RoIs for the second stage: proposals (plus the ground truth) matched and sampled.

Fast R-CNN section 2.3: a fixed number of RoIs per image, a quarter foreground (IoU >= 0.5 with a
ground-truth box), the rest background with IoU in [bg_low, 0.5) — 0.1 in Fast R-CNN, 0 in the later
reference implementations, which also add the ground-truth boxes to the proposals.
"""
import tensorflow as tf

from kerasdet import ops

__all__ = ["sample_rois"]


def sample_rois(proposals, proposal_valid, gt_boxes, gt_labels, num_samples=512,
                positive_fraction=0.25, foreground_iou=0.5, background_iou_low=0.0,
                add_ground_truth=True, seed=None, gt_crowd=None,
                crowd_ioa_threshold=ops.CROWD_IOA_THRESHOLD):
    """Matches proposals to ground truth and samples a fixed number of RoIs per image.

    Args:
        proposals: [B, P, 4]; proposal_valid: bool [B, P] (padding is never sampled).
        gt_boxes: [B, N, 4]; gt_labels: int32 [B, N], 0-based classes, -1 for padding.
        gt_crowd: optional bool [B, N], the batch's ``iscrowd`` (the rule of
            kerasdet.ops.matching): crowd boxes are neither matched against nor appended as
            RoIs (their appended rows are invalid, so the output shapes do not depend on the
            flags), and a proposal that is not foreground with more than `crowd_ioa_threshold` of
            its area inside a crowd box is never sampled as background.

    Returns a dict:
        rois [B, S, 4]; labels int32 [B, S]: class + 1 for foreground, 0 for background, -1 for
        unused slots (when an image has fewer than S usable RoIs); matched_boxes [B, S, 4] (the
        ground truth of each RoI, meaningful for foreground); matched_index int32 [B, S];
        iou [B, S] (the RoI's best IoU, for Cascade R-CNN statistics and the integral loss).
    """
    gt_labels = tf.cast(gt_labels, tf.int32)
    if add_ground_truth:
        gt_valid, _ = ops.split_crowd(gt_labels, gt_crowd)
        proposals = tf.concat([proposals, tf.cast(gt_boxes, proposals.dtype)], axis=1)
        proposal_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    labeled = ops.label_boxes(proposals, gt_boxes, gt_labels, foreground_iou, foreground_iou,
                              background_iou_low, box_valid=proposal_valid, gt_crowd=gt_crowd,
                              crowd_ioa_threshold=crowd_ioa_threshold)
    indices, valid = ops.sample_balanced_indices(labeled.match_labels, num_samples,
                                                 positive_fraction, seed=seed)
    rois = tf.gather(proposals, indices, batch_dims=1)
    matched_index = tf.gather(labeled.matched_index, indices, batch_dims=1)
    return {
        "rois": tf.stop_gradient(rois),
        "labels": tf.where(valid, tf.gather(labeled.classes, indices, batch_dims=1), -1),
        "matched_boxes": ops.gather_by_match(gt_boxes, matched_index),
        "matched_index": matched_index,
        "iou": tf.gather(labeled.iou, indices, batch_dims=1),
    }
