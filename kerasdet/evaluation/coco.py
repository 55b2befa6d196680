"""COCO box and mask AP through pycocotools.

Three ways in:

- ``coco_evaluate(detections, ground_truths)``: both as per-image dicts (see
  ``kerasdet.evaluation._inputs``); the ground-truth COCO object is built in memory (iscrowd, areas,
  binary masks as RLE).
- ``coco_evaluate(detections, coco_gt=annotation_json_or_COCO, category_ids=...)``: ground truth
  from an existing COCO annotation file, restricted to the images of ``detections`` (one dict per
  evaluated image, empty for an image without detections); each detection dict names its
  ``image_id`` (or pass ``image_ids``) and class ids map to COCO category ids through
  ``category_ids``. The file's own areas and crowd flags decide the area ranges and crowd matches,
  so the numbers are the published definitions when detections are in the file's (original) pixels.
- ``coco_evaluate_json(results_json, coco_gt)``: a standard COCO results file.

All return ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
"ARm", "ARl", "per_class_AP"}}`` for iou_type in "bbox" / "segm". Where pycocotools reports -1 (no
ground truth in that area range / class) the value is NaN. No detections at all gives AP 0.
pycocotools' prints are silenced unless ``verbose``.

Coordinates: detections and ground truths must be in the same frame, and the area ranges of
APs/APm/APl (32^2, 96^2) refer to that frame: the published numbers are in original-image pixels,
which is what ``evaluate_model`` passes. The VOC ``difficult`` flag has no COCO counterpart and is
not used here.
"""
import contextlib
import copy
import io
import json
import os

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kerasdet.evaluation._inputs import check_detections, check_ground_truths, check_same_length

__all__ = [
    "COCO_METRIC_NAMES", "coco_evaluate", "coco_evaluate_json", "coco_ground_truth", "coco_results",
    "save_coco_results", "encode_masks", "as_rles",
]

# The order of COCOeval.stats after summarize().
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                     "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_IOU_TYPES = ("bbox", "segm")


@contextlib.contextmanager
def _quiet(verbose):
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def encode_masks(masks, threshold=0.5):
    """Binary-threshold [N, H, W] masks and encode each as a COCO RLE dict with str counts."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [N, H, W], got {masks.shape}")
    binary = masks >= threshold if masks.dtype != bool else masks
    # pycocotools wants a Fortran-ordered uint8 [H, W, N] array.
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # JSON-serializable
    return rles


def as_rles(masks, threshold=0.5):
    """RLE dicts for dense [N, H, W] masks (thresholded), or the given list of RLE dicts as is."""
    if isinstance(masks, (list, tuple)):
        return [dict(rle, counts=rle["counts"].decode("ascii")) if isinstance(rle["counts"], bytes)
                else rle for rle in masks]
    return encode_masks(masks, threshold)


def _mask_size(masks):
    """(height, width) of dense masks or RLE dicts; None when there are no masks."""
    if isinstance(masks, (list, tuple)):
        return tuple(int(s) for s in masks[0]["size"]) if masks else None
    return tuple(int(s) for s in masks.shape[1:])


def _image_size(gt, index):
    if gt.get("image_size") is not None:
        size = np.asarray(gt["image_size"]).reshape(-1)
        if size.shape[0] < 2 or not np.all(np.isfinite(size)):
            raise ValueError(f"ground_truths[{index}]['image_size'] must be (height, width), got {size}")
        return int(size[0]), int(size[1])
    if gt["masks"] is not None and _mask_size(gt["masks"]) is not None:
        return _mask_size(gt["masks"])
    if gt["boxes"].shape[0]:
        # Only polygon decoding needs the size; boxes alone need just a consistent value.
        return int(np.ceil(max(gt["boxes"][:, 3].max(), 1))), int(np.ceil(max(gt["boxes"][:, 2].max(), 1)))
    return 1, 1


def _xyxy_to_xywh(boxes):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def coco_ground_truth(ground_truths, class_ids=None, class_names=None, image_ids=None,
                      mask_threshold=0.5, verbose=False):
    """Build a pycocotools COCO ground-truth object in memory from per-image dicts.

    Args:
      ground_truths: list of dicts with ``boxes`` [M, 4] (x1, y1, x2, y2), ``classes`` [M], optional
        ``iscrowd`` [M], ``area`` [M], ``masks`` [M, H, W] (binary, or probabilities thresholded
        at ``mask_threshold``; or a list of M COCO RLE dicts) and ``image_size`` (height, width).
      class_ids: the class ids that become categories (default: those in ``ground_truths``, or
        0..len(class_names)-1).
      class_names: optional names, indexed by class id.
      image_ids: optional COCO image ids, one per image (default 1..N).

    Returns:
      (coco, category_ids): the COCO object and the dict class id -> COCO category id (id + 1:
      pycocotools treats 0 as "no match" for annotation ids, so ids start at 1 throughout).

    Areas (used for the small / medium / large ranges) are, in order of preference: the ``area``
    entry, the mask's pixel count (COCO's own definition), the box area.
    """
    ground_truths = check_ground_truths(ground_truths)
    image_ids = _image_id_list(image_ids, len(ground_truths), "ground_truths")
    if class_ids is None:
        if class_names is not None:
            class_ids = range(len(class_names))
        else:
            seen = [g["classes"] for g in ground_truths]
            class_ids = np.unique(np.concatenate(seen)) if seen else []
    category_ids = {int(c): int(c) + 1 for c in class_ids}
    categories = [{"id": cat, "name": str(class_names[c]) if class_names is not None else str(c)}
                  for c, cat in category_ids.items()]
    images, annotations = [], []
    for index, (gt, image_id) in enumerate(zip(ground_truths, image_ids)):
        height, width = _image_size(gt, index)
        images.append({"id": image_id, "height": height, "width": width})
        rles = as_rles(gt["masks"], mask_threshold) if gt["masks"] is not None else None
        xywh = _xyxy_to_xywh(gt["boxes"])
        for j in range(gt["boxes"].shape[0]):
            cls = int(gt["classes"][j])
            if cls not in category_ids:
                raise ValueError(f"ground_truths[{index}]['classes'][{j}] = {cls} is not one of the "
                                 f"evaluated classes {sorted(category_ids)}")
            if gt["area"] is not None:
                area = float(gt["area"][j])
            elif rles is not None:
                area = float(mask_utils.area(rles[j]))
            else:
                area = float(xywh[j, 2] * xywh[j, 3])
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[cls],
                   "bbox": xywh[j].tolist(), "area": area, "iscrowd": int(gt["iscrowd"][j])}
            if rles is not None:
                ann["segmentation"] = rles[j]
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with _quiet(verbose):
        coco.createIndex()
    return coco, category_ids


def _image_id(value, index):
    # COCO image ids are ints; VOC's are file stems. pycocotools handles both as long as one set of
    # ids has one type (COCOeval sorts them).
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"image_ids[{index}] must be an int or a str, got {value!r}")


def _image_id_list(image_ids, n, what):
    if image_ids is None:
        return list(range(1, n + 1))
    image_ids = [_image_id(value, i) for i, value in enumerate(image_ids)]
    if len(image_ids) != n:
        raise ValueError(f"image_ids has {len(image_ids)} entries but {what} has {n} images")
    if len(set(image_ids)) != n:
        raise ValueError("image_ids must be unique")
    if len({type(i) for i in image_ids}) > 1:
        raise TypeError("image_ids must be all ints or all strs, not a mix")
    return image_ids


def coco_results(detections, image_ids=None, category_ids=None, iou_types=("bbox",), mask_threshold=0.5):
    """Convert per-image detection dicts to a COCO results list (JSON-serializable).

    Each entry has ``image_id``, ``category_id``, ``score``, and ``bbox`` [x, y, w, h] and/or
    ``segmentation`` (RLE of the thresholded mask), depending on ``iou_types``.
    ``image_ids``: one per image, else each dict's ``image_id`` entry, else 1..N.
    ``category_ids``: dict class id -> COCO category id (default id + 1, as ``coco_ground_truth``).
    """
    detections = check_detections(detections)
    iou_types = _check_iou_types(iou_types)
    if image_ids is None and detections and all("image_id" in d for d in detections):
        image_ids = [d["image_id"] for d in detections]
    image_ids = _image_id_list(image_ids, len(detections), "detections")
    results = []
    for index, (det, image_id) in enumerate(zip(detections, image_ids)):
        n = det["boxes"].shape[0]
        if n == 0:
            continue
        rles = None
        if "segm" in iou_types:
            if det["masks"] is None:
                raise ValueError(f"detections[{index}] has no 'masks' but mask (segm) evaluation was asked")
            rles = as_rles(det["masks"], mask_threshold)
        xywh = _xyxy_to_xywh(det["boxes"])
        for j in range(n):
            cls = int(det["classes"][j])
            if category_ids is None:
                category = cls + 1
            elif cls in category_ids:
                category = int(category_ids[cls])
            else:
                raise ValueError(f"detections[{index}]['classes'][{j}] = {cls} has no entry in category_ids")
            entry = {"image_id": image_id, "category_id": category, "score": float(det["scores"][j])}
            if "bbox" in iou_types:
                entry["bbox"] = xywh[j].tolist()
            if rles is not None:
                entry["segmentation"] = rles[j]
            results.append(entry)
    return results


def save_coco_results(detections, path, image_ids=None, category_ids=None, iou_types=("bbox",),
                      mask_threshold=0.5):
    """Write ``coco_results(...)`` to a JSON file; returns the number of entries written."""
    results = coco_results(detections, image_ids, category_ids, iou_types, mask_threshold)
    _write_json(results, path)
    return len(results)


def _write_json(results, path):
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f)


def _check_iou_types(iou_types):
    if isinstance(iou_types, str):
        iou_types = (iou_types,)
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in _IOU_TYPES:
            raise ValueError(f"iou_types entries must be 'bbox' or 'segm', got {t!r}")
    if not iou_types:
        raise ValueError("iou_types is empty")
    return iou_types


# The last annotation file read, keyed by (path, mtime, size): the evaluation callback scores the
# same validation file every epoch, and COCO val2017's takes about a second to index. COCOeval only
# adds idempotent entries to the ground truth (ignore flags, RLE of polygons), so reuse is safe.
_GT_CACHE = {}


def _load_coco_gt(coco_gt, verbose):
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = os.fspath(coco_gt)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    if key in _GT_CACHE:
        return _GT_CACHE[key]
    with _quiet(verbose):
        try:
            coco = COCO(path)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot read COCO annotations from {path}: {err}") from err
    _GT_CACHE.clear()
    _GT_CACHE[key] = coco
    return coco


def _results_for(results, iou_type, coco_gt, where):
    """The entries usable for one iou type, prepared the way loadRes expects."""
    key = "bbox" if iou_type == "bbox" else "segmentation"
    picked = []
    for k, entry in enumerate(results):
        for field in ("image_id", "category_id", "score"):
            if field not in entry:
                raise ValueError(f"{where}[{k}] has no {field!r}")
        if key not in entry:
            raise ValueError(f"{where}[{k}] has no {key!r}, needed for {iou_type!r} evaluation")
        if not np.isfinite(entry["score"]):
            raise ValueError(f"{where}[{k}]['score'] is not finite: {entry['score']}")
        # loadRes only adds keys (id, area, a box polygon) to each entry: a shallow copy keeps the
        # caller's list intact (a deep copy measured 15 % of the whole evaluation on 5000 images).
        entry = dict(entry)
        if iou_type == "segm":
            # loadRes takes a result's area from its bbox when one is present; mask AP must use the
            # mask area (as detectron2 also does by dropping the box).
            entry.pop("bbox", None)
        picked.append(entry)
    known = set(coco_gt.getImgIds())
    unknown = {e["image_id"] for e in picked} - known
    if unknown:
        raise ValueError(f"{where} names image ids not in the ground truth: {sorted(unknown)[:10]}")
    return picked


def _empty_results(coco_gt):
    # loadRes indexes results[0], so "no detections" needs an empty COCO built by hand; COCOeval
    # then scores every category with ground truth at AP 0.
    dt = COCO()
    dt.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                  "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                  "annotations": []}
    dt.createIndex()
    return dt


def _run_cocoeval(coco_gt, results, iou_type, class_keys, verbose, where, image_ids=None):
    picked = _results_for(results, iou_type, coco_gt, where)
    with _quiet(verbose):
        coco_dt = coco_gt.loadRes(picked) if picked else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            # Only the evaluated images: the others' objects are not missed detections.
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: (float(v) if v > -1 else float("nan"))
               for name, v in zip(COCO_METRIC_NAMES, evaluator.stats)}
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]; AP per class
    # at area "all" and 100 detections, the same cell summarize() averages.
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, cat in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[class_keys.get(cat, cat)] = float(p.mean()) if p.size else float("nan")
    metrics["per_class_AP"] = per_class
    return metrics


def coco_evaluate(detections, ground_truths=None, iou_types=("bbox",), class_names=None,
                  coco_gt=None, category_ids=None, image_ids=None, mask_threshold=0.5, verbose=False,
                  results_file=None):
    """COCO AP / AR for boxes ("bbox") and / or masks ("segm") through pycocotools.

    Args:
      detections: list of per-image dicts: ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores`` [N],
        ``classes`` [N], and ``masks`` [N, H, W] (image-sized probabilities or binary masks, or a
        list of N COCO RLE dicts such as ``encode_masks`` returns) for "segm"; optionally
        ``image_id``.
      ground_truths: list of per-image dicts (see ``coco_ground_truth``), same order; or None
        when ``coco_gt`` is given.
      iou_types: "bbox", "segm" or both.
      class_names: names indexed by class id; used as the keys of ``per_class_AP``.
      coco_gt: a COCO object or the path of a COCO instances JSON, instead of ``ground_truths``.
      category_ids: dict class id -> COCO category id. With ``coco_gt`` the default maps class i to
        the i-th smallest category id (the usual contiguous labelling).
      image_ids: COCO image ids, one per detection dict (else each dict's ``image_id``, else
        1..N); ints, or strs such as VOC file stems. With ``coco_gt`` only these images are scored.
      mask_threshold: masks are binarized with ``mask >= mask_threshold``.
      verbose: let pycocotools print its summary.
      results_file: optional path; the COCO results list given to pycocotools' ``loadRes`` is
        written there as JSON (the format of the COCO evaluation server).

    Returns:
      {iou_type: {metric name: float, "per_class_AP": {class: AP}}}.
    """
    iou_types = _check_iou_types(iou_types)
    if (ground_truths is None) == (coco_gt is None):
        raise ValueError("pass exactly one of ground_truths (per-image dicts) or coco_gt (COCO / JSON path)")
    checked = check_detections(detections)
    if ground_truths is not None:
        check_same_length(checked, ground_truths)
        if class_names is not None:
            class_ids = list(range(len(class_names)))
        else:
            ids = [g["classes"] for g in check_ground_truths(ground_truths)]
            ids += [d["classes"] for d in checked]
            class_ids = np.unique(np.concatenate(ids)).tolist() if ids else []
        for index, det in enumerate(checked):
            bad = [int(c) for c in det["classes"] if int(c) not in class_ids]
            if bad:
                raise ValueError(f"detections[{index}]['classes'] has ids {bad[:5]} outside class_names "
                                 f"(0..{len(class_ids) - 1})")
        coco, category_ids = coco_ground_truth(ground_truths, class_ids, class_names, image_ids,
                                               mask_threshold, verbose)
        image_ids = [img["id"] for img in coco.dataset["images"]]
    else:
        coco = _load_coco_gt(coco_gt, verbose)
        if category_ids is None:
            category_ids = {i: cat for i, cat in enumerate(sorted(coco.getCatIds()))}
        image_ids = _detection_image_ids(checked, image_ids, coco)
    if "segm" in iou_types:
        _check_mask_sizes(checked, coco, image_ids)
    results = coco_results(checked, image_ids, category_ids, iou_types, mask_threshold)
    if results_file is not None:
        _write_json(results, results_file)
    class_keys = _class_keys(coco, category_ids, class_names)
    return {t: _run_cocoeval(coco, results, t, class_keys, verbose, "detections", image_ids)
            for t in iou_types}


def _detection_image_ids(detections, image_ids, coco):
    """The ids of the images ``detections`` describe, checked against the ground truth's."""
    if image_ids is None and detections and all("image_id" in d for d in detections):
        image_ids = [d["image_id"] for d in detections]
    image_ids = _image_id_list(image_ids, len(detections), "detections")
    unknown = [i for i in image_ids if i not in coco.imgs]
    if unknown:
        raise ValueError(f"detections name image ids not in the ground truth: {unknown[:10]}")
    return image_ids


def _check_mask_sizes(detections, coco, image_ids):
    for index, (det, image_id) in enumerate(zip(detections, image_ids)):
        img = coco.imgs[image_id]
        size = _mask_size(det["masks"]) if det["masks"] is not None and len(det["masks"]) else None
        if size is not None and size != (img["height"], img["width"]):
            raise ValueError(f"detections[{index}]['masks'] are {size} but the image is "
                             f"{(img['height'], img['width'])}; masks must be image-sized (per-box grids: "
                             "kerasdet.evaluation.paste_masks)")


def _class_keys(coco, category_ids, class_names):
    """COCO category id -> the key used in per_class_AP (class name, else class id, else COCO name)."""
    keys = {}
    for cls, cat in (category_ids or {}).items():
        keys[cat] = class_names[cls] if class_names is not None and cls < len(class_names) else cls
    for cat in coco.getCatIds():
        if cat not in keys:
            keys[cat] = coco.cats[cat].get("name", cat)
    return keys


def coco_evaluate_json(results, coco_gt, iou_types=("bbox",), class_names=None, category_ids=None,
                       verbose=False, image_ids=None):
    """Evaluate a COCO results file (or an already loaded results list) against ``coco_gt``.

    ``coco_gt`` is a COCO object (e.g. from ``coco_ground_truth``) or an annotation JSON path.
    ``class_names`` / ``category_ids`` only choose the keys of ``per_class_AP``. Entries carrying
    both ``bbox`` and ``segmentation`` serve both iou types. ``image_ids``: score only these images
    (default: every image of ``coco_gt``; a results file does not list images without detections).
    Returns the same dict as ``coco_evaluate``.
    """
    iou_types = _check_iou_types(iou_types)
    coco = _load_coco_gt(coco_gt, verbose)
    where = "results"
    if not isinstance(results, (list, tuple)):
        path = os.fspath(results)
        where = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"COCO results file not found: {path}")
        try:
            with open(path) as f:
                results = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(results, list):
            raise ValueError(f"{path} must hold a JSON list of detections, got {type(results).__name__}")
    if category_ids is None and class_names is not None:
        category_ids = {i: cat for i, cat in enumerate(sorted(coco.getCatIds()))}
    class_keys = _class_keys(coco, category_ids, class_names)
    if image_ids is not None:
        image_ids = _image_id_list(image_ids, len(image_ids), "image_ids")
    return {t: _run_cocoeval(coco, list(results), t, class_keys, verbose, where, image_ids)
            for t in iou_types}
