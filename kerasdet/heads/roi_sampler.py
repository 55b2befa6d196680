"""Training RoIs for the second stage: proposals (plus the ground truth) matched and sampled.

Fast R-CNN section 2.3: a fixed number of RoIs per image, a quarter foreground (IoU >= 0.5 with a
ground-truth box), the rest background with IoU in [bg_low, 0.5) — 0.1 in Fast R-CNN, 0 in the later
reference implementations, which also add the ground-truth boxes to the proposals.
"""
import tensorflow as tf

from kerasdet import ops
from kerasdet.heads.part_config import part_config

__all__ = ["RoIConfig", "sample_rois", "label_rois"]


@part_config("roi_")
class RoIConfig:
    """RoI sampling (Fast R-CNN section 2.3: batch_size RoIs per image, a positive_fraction of
    them foreground at IoU >= foreground_iou, background in [background_iou_low,
    foreground_iou)) and RoI pooling: the `pooling` method of kerasdet.heads.roi_extractor,
    output_size (None: the box head's), sampling_ratio (0 = adaptive) and `aligned` (RoIAlign's
    half-pixel shift, True as Detectron2; torchvision's checkpoints use False).

    ohem: online hard example mining (Shrivastava et al. 2016; R-FCN section 3) instead of the
    sampling: every proposal (and ground-truth box) is labelled, the first box stage computes each
    RoI's loss without gradient, and the batch_size RoIs of highest loss per image are the ones
    the loss is taken on (no foreground fraction). ohem_nms_iou: None selects by loss alone, as
    the R-FCN reference code; 0.7 first suppresses RoIs overlapping a harder one by more than it,
    as the OHEM paper (kerasdet.heads.box_stage.select_hard_examples)."""
    batch_size: int = 512
    positive_fraction: float = 0.25
    foreground_iou: float = 0.5
    background_iou_low: float = 0.0
    pooling: str = "roi_align"
    output_size: int = None
    sampling_ratio: int = 0
    aligned: bool = True
    ohem: bool = False
    ohem_nms_iou: float = None

    def sample(self, proposals, proposal_valid, gt_boxes, gt_labels, seed, gt_crowd=None,
               foreground_iou=None):
        """`sample_rois` with these settings."""
        return sample_rois(proposals, proposal_valid, gt_boxes, gt_labels,
                           num_samples=self.batch_size, positive_fraction=self.positive_fraction,
                           foreground_iou=foreground_iou or self.foreground_iou,
                           background_iou_low=self.background_iou_low, seed=seed,
                           gt_crowd=gt_crowd)

    def label(self, proposals, proposal_valid, gt_boxes, gt_labels, gt_crowd=None,
              foreground_iou=None):
        """`label_rois` with these settings: every RoI labelled, none sampled (OHEM's input)."""
        return label_rois(proposals, proposal_valid, gt_boxes, gt_labels,
                          foreground_iou=foreground_iou or self.foreground_iou,
                          background_iou_low=self.background_iou_low, gt_crowd=gt_crowd)

    @property
    def max_positives(self):
        """The most foreground RoIs a sample holds per image (the sampler's quota)."""
        return max(1, int(self.batch_size * self.positive_fraction))


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
    proposals, labeled = _label(proposals, proposal_valid, gt_boxes, gt_labels, foreground_iou,
                                background_iou_low, add_ground_truth, gt_crowd,
                                crowd_ioa_threshold)
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


def _label(proposals, proposal_valid, gt_boxes, gt_labels, foreground_iou, background_iou_low,
           add_ground_truth, gt_crowd, crowd_ioa_threshold):
    """(the RoIs: proposals [+ ground truth], their `ops.label_boxes` labels)."""
    if add_ground_truth:
        gt_valid, _ = ops.split_crowd(gt_labels, gt_crowd)
        proposals = tf.concat([proposals, tf.cast(gt_boxes, proposals.dtype)], axis=1)
        proposal_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    labeled = ops.label_boxes(proposals, gt_boxes, gt_labels, foreground_iou, foreground_iou,
                              background_iou_low, box_valid=proposal_valid, gt_crowd=gt_crowd,
                              crowd_ioa_threshold=crowd_ioa_threshold)
    return proposals, labeled


def label_rois(proposals, proposal_valid, gt_boxes, gt_labels, foreground_iou=0.5,
               background_iou_low=0.0, add_ground_truth=True, gt_crowd=None,
               crowd_ioa_threshold=ops.CROWD_IOA_THRESHOLD):
    """Every proposal (plus the ground truth) labelled by the rule of `sample_rois`, none sampled:
    the same dict with S = P (+ N); padding, crowd-ignored and between-band RoIs have label -1."""
    gt_labels = tf.cast(gt_labels, tf.int32)
    rois, labeled = _label(proposals, proposal_valid, gt_boxes, gt_labels, foreground_iou,
                           background_iou_low, add_ground_truth, gt_crowd, crowd_ioa_threshold)
    return {
        "rois": tf.stop_gradient(rois),
        "labels": labeled.classes,
        "matched_boxes": ops.gather_by_match(gt_boxes, labeled.matched_index),
        "matched_index": labeled.matched_index,
        "iou": labeled.iou,
    }
