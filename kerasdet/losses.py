"""Losses shared by every detector, with each paper's normalization made explicit.

Two layers of API:

- element-wise functions (``smooth_l1``, ``softmax_cross_entropy``, ``binary_cross_entropy``,
  ``sigmoid_focal``) return the unreduced loss, e.g. for hard negative mining;
- ``*_loss`` functions return a scalar ``sum(weights * loss) / normalizer``. ``weights`` selects
  (0/1) or weighs the entries (default: all 1); ``normalizer`` defaults to ``sum(weights)``, i.e. a
  weighted mean. A zero normalizer gives a loss of 0 (e.g. a batch without positives), never NaN.

Class indices inside heads: 0 is background and dataset class c (0-based) is head class c + 1, so a
softmax over K dataset classes has K + 1 logits (`kerasdet.ops.assign_class_targets` builds such
targets from a match). Sigmoid / focal heads have no background column: K logits, dataset ids.

Normalization by paper (pass these as weights / normalizer):

- Faster R-CNN RPN: objectness cross entropy averaged over the sampled anchors (256 per image);
  box smooth L1 (beta = 1/9, i.e. sigma = 3) summed over positive anchors and divided by the
  number of sampled anchors. The paper's lambda = 10 with N_reg ~ 2400 anchor locations weighs the
  two terms about the same as this.
- Fast R-CNN: L = L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v), lambda = 1, averaged over the
  sampled RoIs (box term summed over foreground RoIs, divided by all sampled RoIs):
  `fast_rcnn_loss`.
- RetinaNet focal loss (alpha 0.25, gamma 2): summed over all non-ignored anchors and classes,
  divided by the number of positive anchors.
- SSD / RefineDet: (L_conf + alpha L_loc) / N with N the number of positive (matched) anchors,
  alpha = 1, the confidence term over positives and mined hard negatives (3:1); 0 if N = 0:
  `multibox_loss`.
- Mask R-CNN: per-pixel sigmoid cross entropy on the m x m mask of the RoI's ground-truth class
  only, averaged over the pixels, then over the positive RoIs: `mask_loss`.
- CC-Net cascade loss: stage t's softmax cross entropy over the RoIs still in the cascade
  (bp_map = 1), divided by their number: `cascade_softmax_loss`; who stays: `cascade_pass_map`.
"""
import math

import keras
import tensorflow as tf

from kerasdet.ops.sampling import hard_negative_mining

__all__ = [
    "smooth_l1",
    "smooth_l1_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_loss",
    "sigmoid_focal",
    "sigmoid_focal_loss",
    "select_class_boxes",
    "fast_rcnn_loss",
    "multibox_loss",
    "mask_loss",
    "weighted_normalized_sum",
    "cascade_pass_map",
    "cascade_softmax_loss",
]


def _as_float(x, name):
    """Tensor in at least float32 (half-precision logits are upcast: mixed-precision safe)."""
    x = tf.convert_to_tensor(x)
    if x.dtype in (tf.float16, tf.bfloat16) or x.dtype.is_integer or x.dtype == tf.bool:
        x = tf.cast(x, tf.float32)
    if not x.dtype.is_floating:
        raise TypeError(f"`{name}` must be numeric, got dtype {x.dtype.name}.")
    return x


def _check_same_shape(a, b, name_a, name_b):
    if not a.shape.is_compatible_with(b.shape):
        raise ValueError(f"`{name_a}` shape {a.shape} does not match `{name_b}` shape {b.shape}.")


def weighted_normalized_sum(values, weights=None, normalizer=None):
    """``sum(weights * values) / normalizer`` as a scalar.

    Args:
        values: per-element losses.
        weights: the shape of `values` or a leading part of it (per-anchor weights [B, N] for
            per-class losses [B, N, K] are repeated over K); default 1.
        normalizer: scalar; default ``sum(weights)`` broadcast to the shape of `values` (the
            weighted mean). Division by 0 gives 0.
    """
    values = _as_float(values, "values")
    if weights is None:
        weights = tf.ones_like(values)
    else:
        weights = tf.cast(tf.convert_to_tensor(weights), values.dtype)
        extra = values.shape.rank - weights.shape.rank
        if extra < 0:
            raise ValueError(
                f"`weights` shape {weights.shape} has more axes than the losses {values.shape}."
            )
        if extra > 0:  # align on the leading axes, repeat over the trailing ones
            weights = tf.reshape(weights, tf.concat([tf.shape(weights), tf.ones([extra], tf.int32)],
                                                    0))
        weights = tf.broadcast_to(weights, tf.shape(values))
    total = tf.reduce_sum(weights * values)
    if normalizer is None:
        normalizer = tf.reduce_sum(weights)
    normalizer = replica_mean_normalizer(tf.cast(normalizer, values.dtype))
    return tf.math.divide_no_nan(total, normalizer)


def replica_mean_normalizer(normalizer):
    """The normalizer of a loss computed on one replica's share of a global batch.

    Under a tf.distribute strategy with N replicas every replica sees 1/N of the batch, and its
    count (sampled anchors, positives, ...) differs from the others'. Dividing the local sum by the
    *global* count divided by N makes the replicas' losses average to exactly the one-device loss of
    the whole batch; `Detector.train_step` then divides by N before the optimizer's SUM all-reduce,
    so the update equals the one-device update. Outside a strategy (or with one replica) the count
    is returned unchanged.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return normalizer
    normalizer = tf.stop_gradient(normalizer)
    total = context.all_reduce(tf.distribute.ReduceOp.SUM, normalizer)
    return total / tf.cast(context.num_replicas_in_sync, normalizer.dtype)


def smooth_l1(x, beta=1.0):
    """Element-wise smooth L1 of Fast R-CNN, generalized by a transition point `beta`:
    ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta``; beta = 0 is plain L1.

    (keras.losses.Huber is beta * smooth_l1 and cannot express beta = 0, hence our own.)
    """
    x = _as_float(x, "x")
    beta = float(beta)
    if beta < 0:
        raise ValueError(f"`beta` must be >= 0, got {beta}.")
    abs_x = tf.abs(x)
    if beta == 0.0:
        return abs_x
    return tf.where(abs_x < beta, 0.5 * tf.square(x) / beta, abs_x - 0.5 * beta)


def smooth_l1_loss(targets, predictions, beta=1.0, weights=None, normalizer=None):
    """Box regression loss: smooth L1 summed over the 4 coordinates of each box (Fast R-CNN's
    L_loc), then ``sum(weights * L_loc) / normalizer`` (see module docstring for each paper's).

    Args:
        targets, predictions: [..., 4] encoded deltas (`kerasdet.ops.encode_boxes`).
        beta: transition point (Fast R-CNN 1; Faster R-CNN RPN 1/9; 0 for L1).
        weights: [...] per box, typically 1 for positives and 0 otherwise.
        normalizer: scalar; default sum(weights).
    """
    targets = _as_float(targets, "targets")
    predictions = _as_float(predictions, "predictions")
    _check_same_shape(targets, predictions, "targets", "predictions")
    per_box = tf.reduce_sum(smooth_l1(predictions - tf.cast(targets, predictions.dtype), beta), -1)
    return weighted_normalized_sum(per_box, weights, normalizer)


def softmax_cross_entropy(labels, logits):
    """Element-wise softmax cross entropy over the last axis of `logits` [..., K + 1].

    `labels` int [...] in [0, K] (0 = background); -1 marks ignored entries, whose loss is 0.
    """
    logits = _as_float(logits, "logits")
    labels = tf.convert_to_tensor(labels)
    if not labels.dtype.is_integer:
        raise TypeError(f"`labels` must be integer class ids, got dtype {labels.dtype.name}.")
    if not labels.shape.is_compatible_with(logits.shape[:-1]):
        raise ValueError(
            f"`labels` shape {labels.shape} must be `logits` shape {logits.shape} without its "
            "last axis."
        )
    valid = labels >= 0
    ce = keras.ops.sparse_categorical_crossentropy(tf.maximum(labels, 0), logits, from_logits=True)
    return tf.where(valid, ce, tf.zeros_like(ce))


def softmax_cross_entropy_loss(labels, logits, weights=None, normalizer=None):
    """Scalar softmax cross entropy; ignored labels (-1) get weight 0 and leave the default
    normalizer (the number of non-ignored entries)."""
    per_entry = softmax_cross_entropy(labels, logits)
    valid = tf.cast(tf.convert_to_tensor(labels) >= 0, per_entry.dtype)
    weights = valid if weights is None else valid * tf.cast(weights, per_entry.dtype)
    return weighted_normalized_sum(per_entry, weights, normalizer)


def binary_cross_entropy(targets, logits):
    """Element-wise sigmoid cross entropy from logits (numerically stable form)."""
    logits = _as_float(logits, "logits")
    targets = tf.cast(_as_float(targets, "targets"), logits.dtype)
    _check_same_shape(targets, logits, "targets", "logits")
    return keras.ops.binary_crossentropy(targets, logits, from_logits=True)


def binary_cross_entropy_loss(targets, logits, weights=None, normalizer=None):
    """Scalar sigmoid cross entropy, ``sum(weights * bce) / normalizer`` (RPN objectness: weights =
    sampled-anchor mask, normalizer = number of sampled anchors = the default)."""
    return weighted_normalized_sum(binary_cross_entropy(targets, logits), weights, normalizer)


def sigmoid_focal(targets, logits, alpha=0.25, gamma=2.0):
    """Element-wise focal loss of RetinaNet: ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    `targets` in {0, 1} with the shape of `logits` (one-hot over K classes, no background column).
    `alpha` None disables the alpha_t balancing.
    """
    logits = _as_float(logits, "logits")
    targets = tf.cast(_as_float(targets, "targets"), logits.dtype)
    _check_same_shape(targets, logits, "targets", "logits")
    # Keras' focal loss is exact from logits (it recovers them from its sigmoid, measured accurate
    # at logit 25 and -40), but it averages over its last axis: a trailing axis of size 1 makes
    # that mean the identity, so the loss stays element-wise.
    loss = keras.losses.binary_focal_crossentropy(
        targets[..., tf.newaxis], logits[..., tf.newaxis], apply_class_balancing=alpha is not None,
        alpha=0.25 if alpha is None else float(alpha), gamma=float(gamma), from_logits=True,
    )
    return tf.cast(loss, logits.dtype)


def sigmoid_focal_loss(targets, logits, alpha=0.25, gamma=2.0, weights=None, normalizer=None):
    """Scalar focal loss. RetinaNet: weights = non-ignored anchors ([..., N], repeated over the K
    classes, or [..., N, K]), normalizer = number of positive anchors (pass it: the default,
    sum of weights over anchors x classes, is not what the paper uses)."""
    per_entry = sigmoid_focal(targets, logits, alpha, gamma)
    return weighted_normalized_sum(per_entry, weights, normalizer)


def select_class_boxes(box_deltas, classes):
    """Picks each RoI's class-specific deltas: [..., R, C, 4] at `classes` [..., R] -> [..., R, 4].
    Out-of-range classes (e.g. background -1 after shifting) are clamped; weight them out."""
    box_deltas = _as_float(box_deltas, "box_deltas")
    classes = tf.convert_to_tensor(classes)
    num_classes = tf.shape(box_deltas)[-2]
    classes = tf.clip_by_value(tf.cast(classes, tf.int32), 0, num_classes - 1)
    one_hot = tf.one_hot(classes, num_classes, dtype=box_deltas.dtype)  # [..., R, C]
    return tf.reduce_sum(box_deltas * one_hot[..., tf.newaxis], axis=-2)


def fast_rcnn_loss(class_targets, class_logits, box_targets, box_deltas, beta=1.0,
                   box_loss_weight=1.0, weights=None, normalizer=None):
    """Fast R-CNN multi-task loss ``L_cls(p, u) + lambda [u >= 1] L_loc(t^u, v)`` over sampled RoIs.

    Args:
        class_targets: int [..., R] head classes u in [0, K] (0 = background, -1 = not sampled).
        class_logits: [..., R, K + 1].
        box_targets: [..., R, 4] encoded targets v (anything for background RoIs).
        box_deltas: [..., R, 4] class-agnostic, or [..., R, K, 4] class-specific for the K
            foreground classes (column u - 1 is used, as in Fast R-CNN's t^u).
        beta: smooth L1 transition (1 in Fast R-CNN).
        box_loss_weight: lambda.
        weights: optional [..., R] extra per-RoI weights (e.g. a padding mask).
        normalizer: default: the number of sampled RoIs (non-negative class targets) — both terms
            are averaged over the sampled RoIs, as in the paper.

    Returns:
        dict with "classification", "box" and "total" scalars.
    """
    class_targets = tf.convert_to_tensor(class_targets)
    sampled = tf.cast(class_targets >= 0, tf.float32)
    if weights is not None:
        sampled = sampled * tf.cast(weights, tf.float32)
    if normalizer is None:
        normalizer = tf.reduce_sum(sampled)
    box_deltas = _as_float(box_deltas, "box_deltas")
    box_targets = _as_float(box_targets, "box_targets")
    if box_deltas.shape.rank == box_targets.shape.rank + 1:
        box_deltas = select_class_boxes(box_deltas, tf.cast(class_targets, tf.int32) - 1)
    foreground = sampled * tf.cast(class_targets >= 1, tf.float32)
    cls = softmax_cross_entropy_loss(class_targets, class_logits, sampled, normalizer)
    box = smooth_l1_loss(box_targets, box_deltas, beta, foreground, normalizer)
    box = box_loss_weight * tf.cast(box, cls.dtype)
    return {"classification": cls, "box": box, "total": cls + box}


def multibox_loss(class_targets, class_logits, box_targets, box_deltas, neg_pos_ratio=3.0,
                  min_negatives=3, beta=1.0, box_loss_weight=1.0):
    """SSD / RefineDet loss ``(L_conf + alpha L_loc) / N`` with online hard negative mining.

    The confidence term is the softmax cross entropy over all positives and the hardest negatives
    (`kerasdet.ops.hard_negative_mining`, `neg_pos_ratio`:1 per image, `min_negatives` for images
    without positives); the localization term is smooth L1 over the positives; N is the number of
    positive anchors in the whole batch, and the loss is 0 when N = 0. RefineDet uses it twice: the
    ARM with 2 classes (object / background), the ODM with K + 1 classes and, as class target -1,
    the negative anchors the ARM already rejects with confidence > 0.99.

    Args:
        class_targets: int [B, N] head classes (0 = background, -1 = ignored).
        class_logits: [B, N, C]; box_targets, box_deltas: [B, N, 4].
        beta: smooth L1 transition (SSD: 1); box_loss_weight: alpha (1).

    Returns:
        dict with "classification", "box" and "total" scalars.
    """
    class_targets = tf.convert_to_tensor(class_targets)
    per_anchor = softmax_cross_entropy(class_targets, class_logits)
    match_labels = tf.where(class_targets > 0, 1, tf.where(class_targets == 0, 0, -1))
    selected = hard_negative_mining(per_anchor, match_labels, neg_pos_ratio, min_negatives)
    positive = tf.cast(class_targets > 0, per_anchor.dtype)
    num_positive = tf.reduce_sum(positive)
    cls = weighted_normalized_sum(per_anchor, tf.cast(selected, per_anchor.dtype), num_positive)
    box = smooth_l1_loss(box_targets, box_deltas, beta, positive, num_positive)
    box = box_loss_weight * tf.cast(box, cls.dtype)
    return {"classification": cls, "box": box, "total": cls + box}


def mask_loss(mask_targets, mask_logits, classes, weights=None, normalizer=None):
    """Mask R-CNN mask loss: for each RoI, the mean over its m x m pixels of the sigmoid cross
    entropy of the logit channel of its ground-truth class only (other classes' masks are not
    penalized); then ``sum(weights * per_roi) / normalizer``.

    Args:
        mask_targets: [..., R, m, m] binary targets of each RoI's matched object, cropped to the
            RoI.
        mask_logits: [..., R, m, m, K] one mask channel per dataset class (channels-last).
        classes: int [..., R] 0-based dataset class of each RoI's ground truth.
        weights: [..., R], 1 for positive RoIs (only they get a mask loss), 0 otherwise.
        normalizer: default sum(weights): the mean over positive RoIs.
    """
    mask_logits = _as_float(mask_logits, "mask_logits")
    mask_targets = tf.cast(_as_float(mask_targets, "mask_targets"), mask_logits.dtype)
    if not mask_targets.shape.is_compatible_with(mask_logits.shape[:-1]):
        raise ValueError(
            f"`mask_targets` shape {mask_targets.shape} must be `mask_logits` shape "
            f"{mask_logits.shape} without the class axis."
        )
    classes = tf.convert_to_tensor(classes)
    if not classes.dtype.is_integer:
        raise TypeError(f"`classes` must be integer class ids, got dtype {classes.dtype.name}.")
    num_classes = tf.shape(mask_logits)[-1]
    one_hot = tf.one_hot(tf.clip_by_value(tf.cast(classes, tf.int32), 0, num_classes - 1),
                         num_classes, dtype=mask_logits.dtype)  # [..., R, K]
    own = tf.reduce_sum(mask_logits * one_hot[..., tf.newaxis, tf.newaxis, :], axis=-1)
    per_roi = tf.reduce_mean(binary_cross_entropy(mask_targets, own), axis=[-2, -1])
    return weighted_normalized_sum(per_roi, weights, normalizer)


def cascade_pass_map(probs, labels, bp_map, threshold, keep_ratio=0.1, positive_quota=16,
                     negative_quota=48):
    """CC-Net's rejection rule (the `bp_map` top of SoftmaxWithCascadeLoss, cascade_type 1): which
    RoIs the next stage's loss counts, per image.

    A RoI stays when it is still counted (`bp_map` = 1, label >= 0) and its predicted probability
    of its own label is below `threshold`: easy positives and easy negatives leave. When fewer
    than ceil(keep_ratio x quota) of the counted positives (negatives) pass, the hardest of them
    (lowest probability of their own label) stay instead, so at least that many of each remain
    (or all of them when fewer are counted). Computed without gradient.

    Args:
        probs: [B, R, K + 1] class probabilities of this stage; labels: int [B, R] (0 background,
            -1 not sampled); bp_map: [B, R] 0/1, the RoIs this stage's loss counted.
        positive_quota / negative_quota: the sampler's foreground / background RoIs per image.

    Returns float32 [B, R] 0/1.
    """
    probs = tf.stop_gradient(_as_float(probs, "probs"))
    labels = tf.cast(labels, tf.int32)
    counted = (tf.cast(bp_map, tf.float32) > 0.0) & (labels >= 0)
    own = tf.gather(probs, tf.maximum(labels, 0), batch_dims=2)
    passed = counted & (own < float(threshold))
    keep = passed
    for group, quota in ((labels >= 1, positive_quota), (labels == 0, negative_quota)):
        candidates = counted & group
        minimum = tf.minimum(int(math.ceil(float(keep_ratio) * int(quota) - 1e-9)),
                             tf.reduce_sum(tf.cast(candidates, tf.int32), axis=1, keepdims=True))
        # rank of each candidate by hardness (lowest own-label probability first); others last
        hardness = tf.where(candidates, own, 2.0)
        order = tf.argsort(hardness, axis=1, stable=True)
        rank = tf.argsort(order, axis=1, stable=True)
        keep = keep | (candidates & (rank < minimum))
    return tf.cast(keep, tf.float32)


def cascade_softmax_loss(labels, logits, bp_map, normalizer=None):
    """CC-Net's cascade loss of one stage (SoftmaxWithCascadeLoss): the softmax cross entropy of
    the RoIs still in the cascade (`bp_map` = 1, label >= 0), so a rejected RoI's loss and gradient
    are exactly 0 (the reference multiplies the gradient by bp_map). normalizer: default the number
    of RoIs counted (the released proto's `normalize` is ambiguous; we divide by the RoIs that
    pass, so the loss is their mean)."""
    weights = tf.stop_gradient(tf.cast(bp_map, tf.float32))
    return softmax_cross_entropy_loss(labels, logits, weights, normalizer)
