"""Checking and normalizing the per-image detection / ground-truth dicts the evaluators take.

Both the VOC and the COCO evaluator read the same structures:

- a detection dict per image: ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores`` [N], ``classes`` [N],
  optional ``masks`` [N, H, W];
- a ground-truth dict per image: ``boxes`` [M, 4], ``classes`` [M], optional ``difficult`` [M],
  ``iscrowd`` [M], ``area`` [M], ``masks`` [M, H, W].

Values may be numpy arrays, lists or eager tensors; they come back as numpy arrays with fixed
dtypes, and every problem is reported with the image index and the key at fault.
"""
import numpy as np

__all__ = ["check_detections", "check_ground_truths", "check_same_length"]


def _as_array(value, index, key, what):
    try:
        # Eager tf.Tensor / keras tensors convert through __array__; lists through numpy.
        return np.asarray(value)
    except Exception as err:  # noqa: BLE001 - re-raised with the record named
        raise TypeError(f"{what}[{index}][{key!r}] cannot be converted to an array: {err}") from err


def _check_boxes(value, index, what):
    boxes = _as_array(value, index, "boxes", what)
    if boxes.size == 0:
        return np.zeros((0, 4), np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what}[{index}]['boxes'] must have shape [N, 4], got {boxes.shape}")
    if not np.issubdtype(boxes.dtype, np.number):
        raise TypeError(f"{what}[{index}]['boxes'] must be numeric, got dtype {boxes.dtype}")
    boxes = boxes.astype(np.float64)
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{what}[{index}]['boxes'] contains NaN or infinite values")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise ValueError(
            f"{what}[{index}]['boxes'][{bad}] = {boxes[bad].tolist()} has x2 < x1 or y2 < y1; "
            "boxes must be (x1, y1, x2, y2)")
    return boxes


def _check_vector(record, key, n, index, what, dtype, required=True, default=None):
    if key not in record or record[key] is None:
        if required:
            raise KeyError(f"{what}[{index}] has no {key!r} entry")
        return np.full((n,), default, dtype=dtype)
    values = _as_array(record[key], index, key, what)
    if values.size == 0 and n == 0:
        return np.zeros((0,), dtype)
    if values.ndim != 1 or values.shape[0] != n:
        raise ValueError(
            f"{what}[{index}][{key!r}] must have shape [{n}] to match 'boxes', got {values.shape}")
    if values.dtype == bool or np.issubdtype(values.dtype, np.number):
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            raise ValueError(f"{what}[{index}][{key!r}] contains NaN or infinite values")
    else:
        raise TypeError(f"{what}[{index}][{key!r}] must be numeric, got dtype {values.dtype}")
    if np.issubdtype(dtype, np.integer) and np.issubdtype(values.dtype, np.floating):
        if np.any(values != np.round(values)):
            raise ValueError(f"{what}[{index}][{key!r}] must hold integers, got {values[:5]}")
    return values.astype(dtype)


def _check_classes(record, n, index, what):
    classes = _check_vector(record, "classes", n, index, what, np.int64)
    if np.any(classes < 0):
        # Padding rows (label -1) must be dropped before evaluation, or they would count as a class.
        negative = np.unique(classes[classes < 0])
        raise ValueError(f"{what}[{index}]['classes'] has negative class ids {negative}; "
                         "drop padding (label -1) before evaluating")
    return classes


def _check_rles(rles, n, index, what):
    if len(rles) != n:
        raise ValueError(f"{what}[{index}]['masks'] has {len(rles)} RLE entries but there are {n} boxes")
    for j, rle in enumerate(rles):
        if "size" not in rle or "counts" not in rle or len(rle["size"]) != 2:
            raise ValueError(f"{what}[{index}]['masks'][{j}] is not a COCO RLE dict with 'size' (h, w) "
                             "and 'counts'")
    return list(rles)


def _check_masks(record, n, index, what):
    """Dense [N, H, W] masks, or a list of COCO RLE dicts (compact for full-size masks)."""
    if record.get("masks") is None:
        return None
    if isinstance(record["masks"], (list, tuple)) and all(isinstance(m, dict) for m in record["masks"]):
        return _check_rles(record["masks"], n, index, what)
    masks = _as_array(record["masks"], index, "masks", what)
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(
            f"{what}[{index}]['masks'] must have shape [{n}, H, W] to match 'boxes', got {masks.shape}")
    if np.issubdtype(masks.dtype, np.floating) and not np.all(np.isfinite(masks)):
        raise ValueError(f"{what}[{index}]['masks'] contains NaN or infinite values")
    return masks


def _check_list(records, what):
    if isinstance(records, dict) or not hasattr(records, "__len__"):
        raise TypeError(f"{what} must be a list with one dict per image, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise TypeError(f"{what}[{index}] must be a dict, got {type(record).__name__}")
        if "boxes" not in record:
            raise KeyError(f"{what}[{index}] has no 'boxes' entry")


def check_detections(detections):
    """Validate per-image detection dicts; return new dicts of numpy arrays.

    Output keys: ``boxes`` float64 [N, 4], ``scores`` float64 [N], ``classes`` int64 [N] and
    ``masks`` (the input array, or None); any other keys (e.g. ``image_id``) are passed through.
    """
    _check_list(detections, "detections")
    checked = []
    for index, record in enumerate(detections):
        boxes = _check_boxes(record["boxes"], index, "detections")
        n = boxes.shape[0]
        out = dict(record)
        out["boxes"] = boxes
        out["scores"] = _check_vector(record, "scores", n, index, "detections", np.float64)
        out["classes"] = _check_classes(record, n, index, "detections")
        out["masks"] = _check_masks(record, n, index, "detections")
        checked.append(out)
    return checked


def check_ground_truths(ground_truths):
    """Validate per-image ground-truth dicts; return new dicts of numpy arrays.

    Output keys: ``boxes`` float64 [M, 4], ``classes`` int64 [M], ``difficult`` bool [M] and
    ``iscrowd`` bool [M] (False where absent), ``area`` float64 [M] or None, ``masks`` or None;
    other keys pass through.
    """
    _check_list(ground_truths, "ground_truths")
    checked = []
    for index, record in enumerate(ground_truths):
        boxes = _check_boxes(record["boxes"], index, "ground_truths")
        n = boxes.shape[0]
        out = dict(record)
        out["boxes"] = boxes
        out["classes"] = _check_classes(record, n, index, "ground_truths")
        out["difficult"] = _check_vector(record, "difficult", n, index, "ground_truths", bool,
                                         required=False, default=False)
        out["iscrowd"] = _check_vector(record, "iscrowd", n, index, "ground_truths", bool,
                                       required=False, default=False)
        if record.get("area") is not None:
            out["area"] = _check_vector(record, "area", n, index, "ground_truths", np.float64)
        else:
            out["area"] = None
        out["masks"] = _check_masks(record, n, index, "ground_truths")
        checked.append(out)
    return checked


def check_same_length(detections, ground_truths):
    """Both lists describe the same images in the same order."""
    if len(detections) != len(ground_truths):
        raise ValueError(
            f"detections has {len(detections)} images but ground_truths has {len(ground_truths)}; "
            "they must list the same images in the same order")
