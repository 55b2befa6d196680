"""Box geometry on dense tensors: area, IoU, format conversions, the R-CNN box coder, clipping,
small-box filtering and class-aware non-maximum suppression.

Convention (DESIGN.md): boxes are float32 ``[..., 4]`` as ``(x1, y1, x2, y2)`` in absolute pixels of
the network input, continuous coordinates (width = x2 - x1, no +1). Everything here is pure
TensorFlow graph code: it runs inside ``tf.function``, on padded batches, and in a SavedModel.
"""
import math

import keras
import tensorflow as tf

from kerasdet.ops.xla import in_xla_context, unsupported

__all__ = [
    "validate_boxes",
    "box_area",
    "box_iou",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "xyxy_to_normalized_yxyx",
    "normalized_yxyx_to_xyxy",
    "encode_boxes",
    "decode_boxes",
    "clip_boxes",
    "valid_boxes_mask",
    "remove_small_boxes",
    "batched_nms",
    "batched_nms_padded",
    "multiclass_nms",
    "DEFAULT_BOX_CODER_WEIGHTS",
    "DEFAULT_CLIP_LOG",
]

#: Fast/Faster R-CNN box-head weights for (dx, dy, dw, dh); the RPN uses (1, 1, 1, 1).
DEFAULT_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
#: Upper bound on the unweighted dw, dh before exp(): boxes grow at most 1000/16 = 62.5 times the
#: anchor, so a wild prediction cannot overflow to inf.
DEFAULT_CLIP_LOG = math.log(1000.0 / 16.0)

_bbox = keras.utils.bounding_boxes


def _as_boxes(boxes, name):
    """Converts to a float32 tensor and checks the static shape [..., 4]; errors name `name`."""
    if isinstance(boxes, (tf.Tensor, tf.Variable)):
        dtype = boxes.dtype
    else:
        boxes = tf.convert_to_tensor(boxes)
        dtype = boxes.dtype
    if not (dtype.is_floating or dtype.is_integer):
        raise TypeError(f"`{name}` must hold numbers (float32 boxes), got dtype {dtype.name}.")
    boxes = tf.cast(boxes, tf.float32)
    shape = boxes.shape
    if shape.rank is not None and (shape.rank < 1 or (shape[-1] is not None and shape[-1] != 4)):
        raise ValueError(
            f"`{name}` must have shape [..., 4] (x1, y1, x2, y2), got shape {shape}."
        )
    return boxes


def validate_boxes(boxes, name="boxes"):
    """Returns `boxes` as float32 after checking shape [..., 4] and that every value is finite.

    The finiteness check is an in-graph assertion (an `InvalidArgumentError` naming `name`), meant
    for data entering the graph (ground truth, anchors); model outputs are not checked so that a
    serving model never aborts on a bad prediction.
    """
    boxes = _as_boxes(boxes, name)
    return tf.debugging.assert_all_finite(boxes, f"`{name}` contains NaN or Inf values")


def box_area(boxes):
    """Area of boxes [..., 4] -> [...]; inverted (x2 < x1 or y2 < y1) boxes have area 0."""
    boxes = _as_boxes(boxes, "boxes")
    x1, y1, x2, y2 = tf.unstack(boxes, 4, axis=-1)
    return tf.maximum(x2 - x1, 0.0) * tf.maximum(y2 - y1, 0.0)


def box_iou(boxes1, boxes2):
    """Pairwise intersection over union.

    Args:
        boxes1: [..., N, 4] boxes (x1, y1, x2, y2).
        boxes2: [..., M, 4] boxes; leading dimensions broadcast against those of `boxes1`
            (e.g. [B, N, 4] x [B, M, 4] -> [B, N, M], or [N, 4] x [B, M, 4] -> [B, N, M]).

    Returns:
        float32 [..., N, M]. Pairs whose union is empty (two zero-area boxes) give 0, never NaN.
    """
    # Not keras.utils.bounding_boxes.compute_iou: it divides by (union + 1e-7), which biases small
    # or normalized boxes (two identical 1e-3 x 1e-3 boxes get IoU 0.909, not 1, measured) and so
    # shifts matches at the thresholds; divide_no_nan is exact and gives 0 for an empty union.
    boxes1 = _as_boxes(boxes1, "boxes1")
    boxes2 = _as_boxes(boxes2, "boxes2")
    if boxes1.shape.rank is not None and boxes1.shape.rank < 2:
        raise ValueError(f"`boxes1` must have shape [..., N, 4], got {boxes1.shape}.")
    if boxes2.shape.rank is not None and boxes2.shape.rank < 2:
        raise ValueError(f"`boxes2` must have shape [..., M, 4], got {boxes2.shape}.")
    a = tf.expand_dims(boxes1, -2)  # [..., N, 1, 4]
    b = tf.expand_dims(boxes2, -3)  # [..., 1, M, 4]
    inter_w = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_h = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = inter_w * inter_h
    union = tf.expand_dims(box_area(boxes1), -1) + tf.expand_dims(box_area(boxes2), -2) - inter
    return tf.math.divide_no_nan(inter, union)


def xyxy_to_cxcywh(boxes):
    """(x1, y1, x2, y2) -> (center x, center y, width, height), same shape."""
    return _bbox.convert_format(_as_boxes(boxes, "boxes"), "xyxy", "center_xywh")


def cxcywh_to_xyxy(boxes):
    """(center x, center y, width, height) -> (x1, y1, x2, y2), same shape."""
    return _bbox.convert_format(_as_boxes(boxes, "boxes"), "center_xywh", "xyxy")


def _image_height_width(image_shape, boxes):
    """Splits `image_shape` ([2] or [..., 2] as (height, width)) into tensors that broadcast
    against the coordinate columns [..., N, 1] of `boxes` [..., N, 4]."""
    shape = tf.cast(tf.convert_to_tensor(image_shape), tf.float32)
    if shape.shape.rank is not None and shape.shape.rank >= 1 and shape.shape[-1] not in (None, 2):
        raise ValueError(
            f"`image_shape` must be (height, width) or per-image [..., 2], got shape {shape.shape}."
        )
    if shape.shape.rank == 1:
        return shape[0], shape[1]
    if shape.shape.rank is None or shape.shape.rank < 1:
        raise ValueError(f"`image_shape` must have a known rank >= 1, got {shape.shape}.")
    if boxes.shape.rank is not None and boxes.shape.rank != shape.shape.rank + 1:
        raise ValueError(
            f"Per-image `image_shape` {shape.shape} needs boxes of rank {shape.shape.rank + 1} "
            f"([..., N, 4]), got boxes of shape {boxes.shape}."
        )
    height = shape[..., 0][..., tf.newaxis, tf.newaxis]
    width = shape[..., 1][..., tf.newaxis, tf.newaxis]
    return height, width


def xyxy_to_normalized_yxyx(boxes, image_shape):
    """Absolute (x1, y1, x2, y2) -> normalized (ymin, xmin, ymax, xmax) in [0, 1] of the image,
    the TF Object Detection API / tf.image convention.

    Args:
        boxes: [..., N, 4].
        image_shape: (height, width) for all boxes, or per-image [..., 2] matching the leading
            dimensions of `boxes` (padded batches of differently sized images).
    """
    boxes = _as_boxes(boxes, "boxes")
    height, width = _image_height_width(image_shape, boxes)
    return _bbox.convert_format(boxes, "xyxy", "rel_yxyx", height=height, width=width)


def normalized_yxyx_to_xyxy(boxes, image_shape):
    """Normalized (ymin, xmin, ymax, xmax) -> absolute (x1, y1, x2, y2); `image_shape` as in
    `xyxy_to_normalized_yxyx`."""
    boxes = _as_boxes(boxes, "boxes")
    height, width = _image_height_width(image_shape, boxes)
    return _bbox.convert_format(boxes, "rel_yxyx", "xyxy", height=height, width=width)


def _coder_weights(weights):
    weights = tuple(float(w) for w in weights)
    if len(weights) != 4 or min(weights) <= 0:
        raise ValueError(f"`weights` must be 4 positive numbers (wx, wy, ww, wh), got {weights}.")
    return weights


def encode_boxes(boxes, anchors, weights=DEFAULT_BOX_CODER_WEIGHTS):
    """R-CNN box regression targets of `boxes` relative to `anchors`.

    With centers/sizes (x, y, w, h) of a box and (xa, ya, wa, ha) of its anchor:
    ``dx = wx (x - xa) / wa, dy = wy (y - ya) / ha, dw = ww log(w / wa), dh = wh log(h / ha)``.

    Args:
        boxes: [..., 4] target boxes, broadcastable against `anchors`.
        anchors: [..., 4] reference boxes (anchors or proposals).
        weights: (wx, wy, ww, wh); (10, 10, 5, 5) for Fast R-CNN heads, (1, 1, 1, 1) for the RPN.

    Returns:
        float32 [..., 4] deltas (dx, dy, dw, dh). Zero-size sides are floored at 1e-7 before the
        log.
    """
    weights = _coder_weights(weights)
    boxes = _as_boxes(boxes, "boxes")
    anchors = _as_boxes(anchors, "anchors")
    # Keras' encoder divides by a "variance"; variance = 1 / weight gives exactly the R-CNN form.
    return _bbox.encode_box_to_deltas(
        anchors, boxes, anchor_format="xyxy", box_format="xyxy", encoding_format="center_xywh",
        variance=[1.0 / w for w in weights],
    )


def decode_boxes(deltas, anchors, weights=DEFAULT_BOX_CODER_WEIGHTS, clip_log=DEFAULT_CLIP_LOG):
    """Inverse of `encode_boxes`: applies deltas (dx, dy, dw, dh) [..., 4] to `anchors` [..., 4].

    dw / wh and dh / wh are clamped at `clip_log` (default log(1000/16)) before exp(), as in
    Detectron, so a wild prediction gives a large but finite box. Gradients flow to `deltas`
    (zero through the clamped part).
    """
    weights = _coder_weights(weights)
    deltas = _as_boxes(deltas, "deltas")
    anchors = _as_boxes(anchors, "anchors")
    # Keras' decoder has no clamp on the size terms (exp overflows to inf), so clamp first.
    clamp = tf.constant([math.inf, math.inf, clip_log * weights[2], clip_log * weights[3]])
    deltas = tf.minimum(deltas, clamp)
    return _bbox.decode_deltas_to_boxes(
        anchors, deltas, anchor_format="xyxy", box_format="xyxy", encoded_format="center_xywh",
        variance=[1.0 / w for w in weights],
    )


def clip_boxes(boxes, image_shape):
    """Clips boxes to the image: x into [0, width], y into [0, height].

    Args:
        boxes: [..., N, 4].
        image_shape: (height, width) for all boxes, or per-image [..., 2] (e.g. [B, 2] for boxes
            [B, N, 4]) so each image of a padded batch is clipped to its own valid size.
    """
    # Own code rather than keras.utils.bounding_boxes.clip_to_image_size: that one takes one scalar
    # size and a {boxes, labels} dict and relabels emptied boxes, which proposals must not get.
    boxes = _as_boxes(boxes, "boxes")
    height, width = _image_height_width(image_shape, boxes)
    x1, y1, x2, y2 = tf.split(boxes, 4, axis=-1)
    x1 = tf.clip_by_value(x1, 0.0, width)
    x2 = tf.clip_by_value(x2, 0.0, width)
    y1 = tf.clip_by_value(y1, 0.0, height)
    y2 = tf.clip_by_value(y2, 0.0, height)
    return tf.concat([x1, y1, x2, y2], axis=-1)


def valid_boxes_mask(boxes, min_size=0.0):
    """Boolean [...] mask of boxes whose width and height are both >= `min_size` and > 0.

    NaN boxes are invalid (comparisons with NaN are false). This is the padded-tensor form of
    Faster R-CNN's "remove proposals smaller than min_size".
    """
    boxes = _as_boxes(boxes, "boxes")
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    min_size = tf.cast(min_size, tf.float32)
    return (w >= min_size) & (h >= min_size) & (w > 0.0) & (h > 0.0)


def remove_small_boxes(boxes, min_size):
    """int32 indices [K] of the boxes [N, 4] that pass `valid_boxes_mask(boxes, min_size)`.

    Dynamic output size: use `valid_boxes_mask` on padded batches and under XLA.
    """
    boxes = _as_boxes(boxes, "boxes")
    if boxes.shape.rank is not None and boxes.shape.rank != 2:
        raise ValueError(f"`boxes` must have shape [N, 4], got {boxes.shape}.")
    return tf.cast(tf.reshape(tf.where(valid_boxes_mask(boxes, min_size)), [-1]), tf.int32)


def _offset_by_class(boxes, classes):
    """Shifts each class's boxes into its own disjoint coordinate range, so one class-agnostic NMS
    acts as a per-class NMS (boxes of different classes then never overlap)."""
    # Subtracting the minimum first keeps the shifted coordinates small and non-negative, which
    # loses less float32 precision than offsetting raw coordinates.
    flat = tf.reshape(boxes, [-1])
    low = tf.reduce_min(tf.concat([flat, [0.0]], 0))
    high = tf.reduce_max(tf.concat([flat, [0.0]], 0))
    span = high - low + 1.0
    offsets = tf.cast(classes, tf.float32) * span
    return boxes - low + offsets[..., tf.newaxis]


def _check_nms_inputs(boxes, scores, classes, batch_rank):
    boxes = _as_boxes(boxes, "boxes")
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    classes = tf.convert_to_tensor(classes)
    if not classes.dtype.is_integer:
        raise TypeError(f"`classes` must be an integer tensor, got dtype {classes.dtype.name}.")
    if boxes.shape.rank is not None and boxes.shape.rank != batch_rank + 2:
        raise ValueError(f"`boxes` must have rank {batch_rank + 2}, got shape {boxes.shape}.")
    for name, t in (("scores", scores), ("classes", classes)):
        if t.shape.rank is not None and t.shape.rank != batch_rank + 1:
            raise ValueError(f"`{name}` must have rank {batch_rank + 1}, got shape {t.shape}.")
        if not t.shape.is_compatible_with(boxes.shape[:-1]):
            raise ValueError(
                f"`{name}` shape {t.shape} does not match boxes shape {boxes.shape} without the 4."
            )
    return boxes, scores, tf.cast(classes, tf.int32)


def batched_nms(boxes, scores, classes, iou_threshold, max_output, score_threshold=float("-inf")):
    """Class-aware greedy non-maximum suppression on one image.

    A box is suppressed by a higher-scoring kept box of the same class whose IoU with it exceeds
    `iou_threshold`; boxes of different classes never suppress each other.

    Args:
        boxes: [N, 4]; scores: [N]; classes: integer [N] (any integer ids).
        iou_threshold: suppression threshold (strictly greater IoU suppresses).
        max_output: at most this many indices are returned.
        score_threshold: boxes with score <= this are dropped first.

    Returns:
        int32 [K] indices into the inputs, sorted by descending score, K <= max_output.

    Clip boxes to the image first: the class offsets scale with the coordinate span, and huge
    unclipped boxes would cost float32 precision in the IoU.
    """
    boxes, scores, classes = _check_nms_inputs(boxes, scores, classes, batch_rank=0)
    return tf.image.non_max_suppression(
        _offset_by_class(boxes, classes), scores, max_output, iou_threshold=iou_threshold,
        score_threshold=score_threshold,
    )


def _padded_nms_indices(boxes, scores, max_output, iou_threshold, score_threshold):
    """Greedy NMS per image of a [B, N, 4] batch: (indices [B, max_output] padded, counts [B])."""
    if in_xla_context():
        # The batched tiled algorithm is the one form XLA compiles.
        return tf.image.non_max_suppression_padded(
            boxes, scores, max_output, iou_threshold=iou_threshold, score_threshold=score_threshold,
            pad_to_max_output_size=True)

    # Elsewhere the single-image greedy kernel, image by image: the tiled algorithm repeats each tile
    # until nothing changes, which on clustered boxes (a trained RPN's proposals, most of them
    # suppressed) measured 0.37 s against 0.043 s for B=2, N=8741, up to 2000 kept, and 0.040 against
    # 0.030 s on spread-out boxes (benchmarks/nms_speed.py). Same indices (tests/test_ops_boxes.py).
    def one_image(image):
        image_boxes, image_scores = image
        selected, count = tf.raw_ops.NonMaxSuppressionV4(
            boxes=image_boxes, scores=image_scores, max_output_size=max_output,
            iou_threshold=tf.constant(iou_threshold, tf.float32),
            score_threshold=tf.constant(score_threshold, tf.float32), pad_to_max_output_size=True)
        return selected, count

    return tf.map_fn(one_image, (tf.cast(boxes, tf.float32), tf.cast(scores, tf.float32)),
                     fn_output_signature=(tf.int32, tf.int32))


def batched_nms_padded(boxes, scores, classes, iou_threshold, max_output,
                       score_threshold=float("-inf"), pre_nms_top_k=None):
    """Class-aware NMS for a padded batch, with fixed-size outputs.

    Per image: keep the `pre_nms_top_k` highest scores (if given), drop scores <= `score_threshold`,
    run class-aware greedy NMS (as `batched_nms`), keep at most `max_output` boxes by descending
    score. Padding entries of the input should carry a score <= `score_threshold`.

    Args:
        boxes: [B, N, 4]; scores: [B, N]; classes: integer [B, N].
        iou_threshold, score_threshold: as in `batched_nms`.
        max_output: Python int, the fixed number K of output slots per image.
        pre_nms_top_k: optional Python int bounding the NMS work per image.

    Returns:
        dict with `indices` int32 [B, K] into the N inputs (-1 in unused slots), `boxes` [B, K, 4]
        (0 in unused slots), `scores` [B, K] (0), `classes` int32 [B, K] (-1) and
        `num_detections` int32 [B]. Valid slots come first, sorted by descending score.
    """
    boxes, scores, classes = _check_nms_inputs(boxes, scores, classes, batch_rank=1)
    max_output = int(max_output)
    if pre_nms_top_k is not None:
        k = tf.minimum(int(pre_nms_top_k), tf.shape(scores)[1])
        scores, top = tf.math.top_k(scores, k=k)
        boxes = tf.gather(boxes, top, batch_dims=1)
        classes = tf.gather(classes, top, batch_dims=1)
    else:
        top = None
    indices, counts = _padded_nms_indices(_offset_by_class(boxes, classes), scores, max_output,
                                          iou_threshold, score_threshold)
    counts = tf.cast(counts, tf.int32)
    indices = tf.where(tf.range(max_output)[tf.newaxis, :] < counts[:, tf.newaxis],
                       tf.cast(indices, tf.int32), -1)
    valid = indices >= 0
    safe = tf.maximum(indices, 0)
    out_boxes = tf.where(valid[..., tf.newaxis], tf.gather(boxes, safe, batch_dims=1), 0.0)
    out_scores = tf.where(valid, tf.gather(scores, safe, batch_dims=1), 0.0)
    out_classes = tf.where(valid, tf.gather(classes, safe, batch_dims=1), -1)
    if top is not None:
        indices = tf.where(valid, tf.gather(top, safe, batch_dims=1), -1)
    return {
        "indices": indices,
        "boxes": out_boxes,
        "scores": out_scores,
        "classes": out_classes,
        "num_detections": counts,
    }


def multiclass_nms(boxes, scores, max_detections, iou_threshold=0.5, score_threshold=0.05,
                   max_per_class=None, pre_nms_top_k=None):
    """Per-class NMS over a score matrix: the usual detector post-processing.

    Args:
        boxes: [B, N, 4] class-agnostic boxes, or [B, N, C, 4] one box per class.
        scores: [B, N, C] per-class scores for the C foreground classes (drop the background
            column first); class c of the output is column c, i.e. the 0-based dataset id.
        max_detections: K, the fixed number of output slots per image (top-K over all classes).
        iou_threshold: suppression threshold; score_threshold: scores <= this are dropped.
        max_per_class: optional cap on the boxes kept per class per image. When given, the work is
            done by tf.image.combined_non_max_suppression (pixel coordinates, no [0, 1] clipping),
            which XLA cannot compile. When None, the (box, class) pairs are flattened and run
            through `batched_nms_padded` (XLA-compatible); the results are the same as a cap of K.
        pre_nms_top_k: with max_per_class None, keep only this many highest-scoring (box, class)
            pairs per image before NMS (bounds the work; e.g. 1000 per image).

    Returns:
        dict with `boxes` [B, K, 4], `scores` [B, K], `classes` int32 [B, K] (-1 in unused slots)
        and `num_detections` int32 [B]; valid slots first, by descending score.
    """
    boxes = _as_boxes(boxes, "boxes")
    scores = tf.cast(tf.convert_to_tensor(scores), tf.float32)
    if scores.shape.rank is not None and scores.shape.rank != 3:
        raise ValueError(f"`scores` must have shape [B, N, C], got {scores.shape}.")
    if boxes.shape.rank == 3:
        boxes = boxes[:, :, tf.newaxis, :]
    elif boxes.shape.rank != 4:
        raise ValueError(f"`boxes` must have shape [B, N, 4] or [B, N, C, 4], got {boxes.shape}.")
    max_detections = int(max_detections)
    if max_per_class is not None and in_xla_context():
        if int(max_per_class) < max_detections:
            raise unsupported(f"multiclass_nms with max_per_class={max_per_class} < max_detections="
                              f"{max_detections} (tf.image.combined_non_max_suppression)",
                              "Without the cap (max_per_class >= max_detections) it compiles.")
        max_per_class = None  # a cap of K or more never binds: same results, XLA-compatible path
    if max_per_class is None:
        shape = tf.shape(scores)
        batch, num_classes = shape[0], shape[2]
        flat_boxes = tf.reshape(tf.broadcast_to(boxes, tf.concat([shape, [4]], 0)), [batch, -1, 4])
        flat_classes = tf.broadcast_to(tf.range(num_classes), shape)
        out = batched_nms_padded(
            flat_boxes, tf.reshape(scores, [batch, -1]), tf.reshape(flat_classes, [batch, -1]),
            iou_threshold, max_detections, score_threshold=score_threshold,
            pre_nms_top_k=pre_nms_top_k,
        )
        out.pop("indices")
        return out
    nmsed_boxes, nmsed_scores, nmsed_classes, count = tf.image.combined_non_max_suppression(
        boxes, scores, max_output_size_per_class=int(max_per_class),
        max_total_size=max_detections, iou_threshold=iou_threshold,
        score_threshold=score_threshold, clip_boxes=False,
    )
    valid = tf.range(max_detections)[tf.newaxis, :] < count[:, tf.newaxis]
    return {
        "boxes": nmsed_boxes,
        "scores": nmsed_scores,
        "classes": tf.where(valid, tf.cast(nmsed_classes, tf.int32), -1),
        "num_detections": tf.cast(count, tf.int32),
    }
