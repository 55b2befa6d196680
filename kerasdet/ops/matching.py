"""IoU-based matching of anchors / proposals to ground-truth boxes.

Labels per anchor: 1 = positive (foreground), 0 = negative (background), -1 = ignored (neither
sampled nor penalized). Works on padded batches: every op reduces over the last two axes of an
IoU matrix [..., N_anchors, M_gt], with padded ground truth excluded by a validity mask.

Typical RPN targets inside a train_step (anchors [N, 4], padded gt_boxes [B, M, 4] and gt_labels
[B, M] with -1 padding)::

    iou = ops.box_iou(anchors, gt_boxes)                                   # [B, N, M]
    matched, labels = ops.Matcher.rpn()(iou, gt_valid=gt_labels >= 0,
                                        anchor_valid=ops.anchors_inside_image_mask(anchors, hw))
    box_targets = ops.encode_boxes(ops.gather_by_match(gt_boxes, matched), anchors, (1, 1, 1, 1))
    class_targets = ops.assign_class_targets(labels, ops.gather_by_match(gt_labels, matched))
    sampled = ops.sample_balanced(labels, 256, 0.5, seed=self.seed_generator)   # [B, N] bool
"""
import collections

import tensorflow as tf

from kerasdet.ops.boxes import box_iou

__all__ = [
    "POSITIVE",
    "NEGATIVE",
    "IGNORE",
    "CROWD_IOA_THRESHOLD",
    "match_boxes",
    "split_crowd",
    "crowd_ignore_mask",
    "Matcher",
    "gather_by_match",
    "assign_class_targets",
    "BoxLabels",
    "label_boxes",
]

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1
#: Share of an anchor's / RoI's area inside a crowd region above which it is ignored (Detectron).
CROWD_IOA_THRESHOLD = 0.7


def _check_mask(mask, name, expected_shape):
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        raise TypeError(f"`{name}` must be a boolean mask, got dtype {mask.dtype.name}.")
    if not mask.shape.is_compatible_with(expected_shape):
        raise ValueError(f"`{name}` must have shape {expected_shape}, got {mask.shape}.")
    return mask


def match_boxes(iou, positive_threshold, negative_threshold=None, negative_lower_bound=0.0,
                allow_low_quality_matches=False, gt_valid=None, anchor_valid=None, ignore=None):
    """Matches each anchor to its highest-IoU valid ground truth and labels it.

    With ``max_iou`` the anchor's best IoU over valid ground truth:

    - ``max_iou >= positive_threshold`` -> 1;
    - ``negative_lower_bound <= max_iou < negative_threshold`` -> 0;
    - otherwise -> -1 (the band between the thresholds, and below `negative_lower_bound`).

    RPN (Faster R-CNN): positive 0.7, negative 0.3, lower bound 0, low-quality matches on.
    RoI heads: positive 0.5, negative 0.5 (default: = positive), lower bound 0 (Detectron) or 0.1
    (Fast R-CNN, whose background RoIs have IoU in [0.1, 0.5)).

    Low-quality rule (Faster R-CNN): for each valid ground truth whose best IoU over anchors is
    > 0, every anchor reaching that best IoU (ties included) is also positive. Such an anchor keeps
    its own best ground truth as its match, as in the original code. A ground truth that overlaps
    no anchor at all creates no positives.

    An image with no valid ground truth labels all its (valid) anchors 0, whatever the lower bound:
    the lower bound only narrows background to hard negatives near objects, and there are none.

    Args:
        iou: float [..., N, M] IoU of N anchors with M ground-truth boxes.
        positive_threshold, negative_threshold, negative_lower_bound: see above;
            negative_threshold defaults to positive_threshold.
        allow_low_quality_matches: apply the low-quality rule.
        gt_valid: optional bool [..., M]; False marks padded ground truth (label -1 rows).
        anchor_valid: optional bool [..., N]; False anchors (e.g. crossing the image border, or
            padded proposals) get label -1 and take no part in the low-quality rule.
        ignore: optional bool [..., N]; True anchors that are not positive get label -1 instead
            of 0 (crowd regions: `crowd_ignore_mask`). A positive stays positive.

    Returns:
        (matched_gt_indices int32 [..., N], labels int32 [..., N]). The index is the anchor's
        best valid ground truth; 0 when the image has none (use `gather_by_match`, which is safe
        then, to gather targets). Only meaningful where labels == 1.
    """
    if negative_threshold is None:
        negative_threshold = positive_threshold
    if not 0.0 <= negative_lower_bound <= negative_threshold <= positive_threshold:
        raise ValueError(
            "Thresholds must satisfy 0 <= negative_lower_bound <= negative_threshold <= "
            f"positive_threshold, got {negative_lower_bound}, {negative_threshold}, "
            f"{positive_threshold}."
        )
    iou = tf.cast(tf.convert_to_tensor(iou), tf.float32)
    if iou.shape.rank is not None and iou.shape.rank < 2:
        raise ValueError(f"`iou` must have shape [..., N_anchors, M_gt], got {iou.shape}.")
    num_gt = tf.shape(iou)[-1]
    if anchor_valid is not None:
        anchor_valid = _check_mask(anchor_valid, "anchor_valid", iou.shape[:-1])
    if gt_valid is None:
        gt_valid = tf.ones(tf.concat([tf.shape(iou)[:-2], [num_gt]], 0), tf.bool)
    else:
        gt_valid = _check_mask(gt_valid, "gt_valid", iou.shape[:-2].concatenate(iou.shape[-1:]))
    # -1 < any real IoU: padded ground truth can never be the best match.
    masked = tf.where(gt_valid[..., tf.newaxis, :], iou, -1.0)
    # A sentinel column keeps max/argmax defined when M == 0.
    sentinel = tf.fill(tf.concat([tf.shape(masked)[:-1], [1]], 0), -1.0)
    with_sentinel = tf.concat([masked, sentinel], axis=-1)
    max_iou = tf.reduce_max(with_sentinel, axis=-1)
    matched = tf.argmax(with_sentinel, axis=-1, output_type=tf.int32)
    matched = tf.minimum(matched, tf.maximum(num_gt - 1, 0))

    has_gt = tf.reduce_any(gt_valid, axis=-1, keepdims=True)  # [..., 1]
    positive = max_iou >= positive_threshold
    negative = (max_iou >= negative_lower_bound) & (max_iou < negative_threshold)
    negative = tf.where(has_gt, negative, True)

    if allow_low_quality_matches:
        candidates = masked
        if anchor_valid is not None:
            candidates = tf.where(anchor_valid[..., tf.newaxis], masked, -1.0)
        best_per_gt = tf.reduce_max(candidates, axis=-2, keepdims=True)  # [..., 1, M]
        is_best = (candidates == best_per_gt) & (best_per_gt > 0.0) & gt_valid[..., tf.newaxis, :]
        positive = positive | tf.reduce_any(is_best, axis=-1)

    if ignore is not None:
        negative = negative & ~_check_mask(ignore, "ignore", iou.shape[:-1])
    labels = tf.where(positive, POSITIVE, tf.where(negative, NEGATIVE, IGNORE))
    if anchor_valid is not None:
        labels = tf.where(anchor_valid, labels, IGNORE)
    return matched, tf.cast(labels, tf.int32)


def split_crowd(gt_labels, gt_crowd=None):
    """(gt_valid, crowd_valid) bool [..., M]: the ground truth anchors are matched against, and the
    crowd regions that only make anchors ignored. Padding (label -1) is in neither.

    Args:
        gt_labels: int [..., M], -1 for padding.
        gt_crowd: optional bool [..., M] (the batch's ``iscrowd``); None means no crowd region.
    """
    present = tf.convert_to_tensor(gt_labels) >= 0
    if gt_crowd is None:
        return present, tf.zeros_like(present)
    gt_crowd = _check_mask(gt_crowd, "gt_crowd", present.shape)
    return present & ~gt_crowd, present & gt_crowd


def _intersection_over_own_area(boxes, regions):
    """[..., N, M]: area of ``boxes[n] & regions[m]`` divided by the area of ``boxes[n]``
    (0 for an empty box)."""
    a = tf.expand_dims(tf.cast(boxes, tf.float32), -2)  # [..., N, 1, 4]
    b = tf.expand_dims(tf.cast(regions, tf.float32), -3)  # [..., 1, M, 4]
    inter_w = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_h = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    area = tf.maximum(a[..., 2] - a[..., 0], 0.0) * tf.maximum(a[..., 3] - a[..., 1], 0.0)
    return tf.math.divide_no_nan(inter_w * inter_h, area)


def crowd_ignore_mask(boxes, crowd_boxes, crowd_valid, threshold=CROWD_IOA_THRESHOLD):
    """bool [..., N]: True for the boxes (anchors, RoIs) more than `threshold` of whose area lies
    inside one valid crowd region — the ``ignore`` of `match_boxes` (see the module docstring for
    why the candidate's own area and not IoU).

    Args:
        boxes: [..., N, 4] anchors or RoIs; leading dimensions broadcast against `crowd_boxes`'
            ([N, 4] anchors with [B, M, 4] crowd boxes give [B, N]).
        crowd_boxes: [..., M, 4]; crowd_valid: bool [..., M] (from `split_crowd`).
        threshold: the strict lower bound on the covered share of the box's area.
    """
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}.")
    ioa = _intersection_over_own_area(boxes, crowd_boxes)
    inside = (ioa > threshold) & tf.cast(crowd_valid, tf.bool)[..., tf.newaxis, :]
    return tf.reduce_any(inside, axis=-1)


def gather_by_match(gt_values, matched_gt_indices, fill_value=0):
    """Per-anchor targets: ``gt_values[..., matched_gt_indices[..., i], ...]``.

    Args:
        gt_values: [..., M, ...] per-ground-truth values (boxes [B, M, 4], labels [B, M], ...).
        matched_gt_indices: int [..., N] from `match_boxes`, same leading (batch) dimensions.
        fill_value: what anchors of an image with M == 0 get.

    Returns:
        [..., N, ...].
    """
    gt_values = tf.convert_to_tensor(gt_values)
    matched_gt_indices = tf.convert_to_tensor(matched_gt_indices)
    batch_dims = matched_gt_indices.shape.rank - 1
    if batch_dims < 0 or gt_values.shape.rank is None or gt_values.shape.rank <= batch_dims:
        raise ValueError(
            f"`gt_values` {gt_values.shape} must have the batch dimensions of "
            f"`matched_gt_indices` {matched_gt_indices.shape} plus the M axis."
        )
    # One fill row after the M real rows makes the gather valid even when M == 0.
    pad_shape = tf.tensor_scatter_nd_update(tf.shape(gt_values), [[batch_dims]], [1])
    fill = tf.fill(pad_shape, tf.cast(fill_value, gt_values.dtype))
    padded = tf.concat([gt_values, fill], axis=batch_dims)
    return tf.gather(padded, matched_gt_indices, axis=batch_dims, batch_dims=batch_dims)


def assign_class_targets(match_labels, matched_gt_labels):
    """Softmax-head class targets from a match: positive -> dataset class + 1, negative -> 0
    (background), ignored -> -1.

    Args:
        match_labels: int [..., N] 1 / 0 / -1 from `match_boxes`.
        matched_gt_labels: int [..., N] 0-based dataset class of each anchor's matched ground truth
            (``gather_by_match(gt_labels, matched_gt_indices)``).
    """
    match_labels = tf.convert_to_tensor(match_labels)
    matched_gt_labels = tf.cast(tf.convert_to_tensor(matched_gt_labels), tf.int32)
    return tf.where(match_labels == POSITIVE, matched_gt_labels + 1,
                    tf.where(match_labels == NEGATIVE, 0, -1))


BoxLabels = collections.namedtuple("BoxLabels", ["matched_index", "match_labels", "classes", "iou"])
BoxLabels.__doc__ = """What `label_boxes` returns, each [B, N]: matched_index int32 (best valid ground
truth), match_labels int32 1 / 0 / -1 (`match_boxes`), classes int32 (dataset class + 1 for
positives, 0 for negatives, -1 ignored: the softmax heads' targets) and iou float32 (best IoU with
valid ground truth, 0 without any)."""


def label_boxes(boxes, gt_boxes, gt_labels, positive_threshold, negative_threshold=None,
                negative_lower_bound=0.0, allow_low_quality_matches=False, box_valid=None,
                gt_crowd=None, crowd_ioa_threshold=CROWD_IOA_THRESHOLD):
    """The one labelling rule of every region-based stage (RPN anchors, sampled RoIs, cascade
    stages): match each box to its best valid ground truth, label it by the IoU bands of
    `match_boxes`, ignore non-positives lying in a crowd region, and name the class.

    Args:
        boxes: [B, N, 4] RoIs, or [1, N, 4] anchors shared by the batch.
        gt_boxes: [B, M, 4]; gt_labels: int [B, M] 0-based, -1 for padding.
        positive_threshold, negative_threshold, negative_lower_bound, allow_low_quality_matches:
            the bands of `match_boxes`.
        box_valid: optional bool [B, N]; invalid boxes get -1 (padding, cross-boundary anchors).
        gt_crowd: optional bool [B, M] ``iscrowd``: crowd boxes are not matched against; a box that
            is not positive with more than `crowd_ioa_threshold` of its area inside one is ignored.

    Returns a `BoxLabels`.
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_labels = tf.cast(gt_labels, tf.int32)
    gt_valid, crowd_valid = split_crowd(gt_labels, gt_crowd)
    iou = box_iou(boxes, gt_boxes)  # [B, N, M]
    on_crowd = None
    if gt_crowd is not None:
        on_crowd = crowd_ignore_mask(boxes, gt_boxes, crowd_valid, crowd_ioa_threshold)
    matched, labels = match_boxes(iou, positive_threshold, negative_threshold,
                                  negative_lower_bound, allow_low_quality_matches,
                                  gt_valid=gt_valid, anchor_valid=box_valid, ignore=on_crowd)
    classes = assign_class_targets(labels, gather_by_match(gt_labels, matched))
    # A zero column keeps the max defined for images without (valid) ground truth.
    masked = tf.where(gt_valid[:, tf.newaxis, :], iou, 0.0)
    best_iou = tf.reduce_max(tf.concat([masked, tf.zeros_like(masked[..., :1])], -1), axis=-1)
    return BoxLabels(matched, labels, classes, best_iou)


class Matcher:
    """`match_boxes` with its settings held as a config (``get_config`` / ``from_config``)."""

    def __init__(self, positive_threshold, negative_threshold=None, negative_lower_bound=0.0,
                 allow_low_quality_matches=False):
        if negative_threshold is None:
            negative_threshold = positive_threshold
        if not 0.0 <= negative_lower_bound <= negative_threshold <= positive_threshold:
            raise ValueError(
                "Thresholds must satisfy 0 <= negative_lower_bound <= negative_threshold <= "
                f"positive_threshold, got {negative_lower_bound}, {negative_threshold}, "
                f"{positive_threshold}."
            )
        self.positive_threshold = float(positive_threshold)
        self.negative_threshold = float(negative_threshold)
        self.negative_lower_bound = float(negative_lower_bound)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou, gt_valid=None, anchor_valid=None, ignore=None):
        """(matched_gt_indices, labels) as in `match_boxes`."""
        return match_boxes(iou, self.positive_threshold, self.negative_threshold,
                           self.negative_lower_bound, self.allow_low_quality_matches,
                           gt_valid=gt_valid, anchor_valid=anchor_valid, ignore=ignore)

    def get_config(self):
        return {"positive_threshold": self.positive_threshold,
                "negative_threshold": self.negative_threshold,
                "negative_lower_bound": self.negative_lower_bound,
                "allow_low_quality_matches": self.allow_low_quality_matches}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def rpn(cls):
        """Faster R-CNN RPN: >= 0.7 positive, < 0.3 negative, best anchor per object positive."""
        return cls(0.7, 0.3, 0.0, allow_low_quality_matches=True)

    @classmethod
    def fast_rcnn(cls):
        """Fast R-CNN RoIs: >= 0.5 foreground, [0.1, 0.5) background, < 0.1 unused."""
        return cls(0.5, 0.5, 0.1)

    @classmethod
    def roi_heads(cls, iou_threshold=0.5):
        """Detectron-style RoI heads / cascade stages (0.5, 0.6, 0.7): >= t fg, < t bg."""
        return cls(iou_threshold, iou_threshold, 0.0)
