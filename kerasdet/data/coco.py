"""COCO instances JSON reader.

Boxes: COCO's [x, y, width, height] are continuous pixel coordinates already, so x2 = x + width with no
+1. Categories are mapped to contiguous 0-based labels in increasing category-id order; the data set keeps
the map both ways (``category_ids``). Images without annotations are kept (negatives matter).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from kerasdet.data.images import check_image, check_image_pixels
from kerasdet.data.records import (BadInputError, BadInputReport, DetectionDataset, DetectionRecord,
                                   FatalInputError, check_on_bad, resolve_image_path, sanitize_boxes)


class CocoDetectionDataset(DetectionDataset):
    """A DetectionDataset that remembers the annotation file it was read from.

    Evaluation scores against that file with pycocotools (its image ids, sizes, areas and crowd
    flags), not against the records, which the reader has clipped and filtered.
    """

    def __init__(self, *args, annotation_file: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.annotation_file = os.path.abspath(os.fspath(annotation_file))

    def subset(self, indices) -> "CocoDetectionDataset":
        return CocoDetectionDataset([self.records[i] for i in indices], self.class_names, self.root,
                                    self.category_ids, self.report,
                                    annotation_file=self.annotation_file)


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise BadInputError(f"{path}: not a COCO instances file (needs 'images' and 'categories')")
    return data


def load_coco(annotation_file: str, image_root: str, *, on_bad: str = "error",
              check_images: str = "header", load_masks: bool = True,
              skip_empty: bool = False, max_image_pixels: int | None = None) -> DetectionDataset:
    """Read a COCO instances JSON file.

    Args:
        annotation_file: path of the instances JSON.
        image_root: directory the images' ``file_name`` entries are relative to. File names that are
            absolute, contain ``..`` or resolve outside it through a symlink always raise BadInputError.
        on_bad: "error" raises BadInputError naming the file and record for a missing/unreadable image,
            an annotation of an unknown image or category id, or a malformed bbox; "skip" drops that
            image (or annotation) and counts it in ``dataset.report`` with one warning at the end.
            Whatever the policy, NaN/infinite boxes raise; degenerate boxes (w or h <= 0) and boxes
            entirely outside the image are dropped with a counted warning, boxes partly outside are
            clipped to the image.
        check_images: "header" (default) opens each image's header to check it exists, is an image and
            has the annotated size; "decode" decodes it fully (catches corrupt pixel data); "none" trusts
            the JSON.
        load_masks: keep each annotation's segmentation (polygons or RLE) in ``record.masks``.
        skip_empty: drop images without (valid) objects; by default they are kept as negatives.
        max_image_pixels: refuse images whose declared (JSON or header) height x width is larger,
            before any pixel is decoded (decompression bombs); default
            ``kerasdet.data.images.max_image_pixels()`` (KERASDET_MAX_IMAGE_PIXELS).

    With on_bad="error" the reader goes through the whole file and raises one BadInputError that
    lists every bad record (file, record, reason).

    Returns:
        CocoDetectionDataset with ``category_ids`` (label -> COCO category id) and
        ``annotation_file`` (absolute path).
    """
    check_on_bad(on_bad)
    data = _load_json(annotation_file)
    report = BadInputReport(f"COCO {annotation_file}")
    categories = _list_of_dicts(data, "categories", annotation_file)
    for i, c in enumerate(categories):
        if not _is_id(c.get("id")):
            raise BadInputError(f"{annotation_file} category {i}: id {c.get('id')!r} is not an integer")
    categories = sorted(categories, key=lambda c: int(c["id"]))
    category_ids = [int(c["id"]) for c in categories]
    if len(set(category_ids)) != len(category_ids):
        raise BadInputError(f"{annotation_file}: duplicate category ids")
    label_of = {c: i for i, c in enumerate(category_ids)}
    class_names = [str(c.get("name", c["id"])) for c in categories]

    images = {}
    for i, image in enumerate(_list_of_dicts(data, "images", annotation_file)):
        image_id = image.get("id")
        if not _is_id(image_id, str):
            error = BadInputError(f"{annotation_file} image {i}: id {image_id!r} is not an integer or string")
            if on_bad == "error":
                report.collect(error)
            else:
                report.add("image with a malformed id skipped", f"{annotation_file} image {i}")
            continue
        if image_id in images:
            raise BadInputError(f"{annotation_file}: duplicate image id {image_id!r}")
        images[image_id] = image
    annotations = defaultdict(list)
    for i, ann in enumerate(_list_of_dicts(data, "annotations", annotation_file, required=False)):
        image_id = ann.get("image_id")
        if not _is_id(image_id, str) or image_id not in images:
            where = f"{annotation_file} annotation {ann.get('id')!r} (entry {i})"
            if on_bad == "error":
                report.collect(BadInputError(f"{where}: unknown image id {image_id!r}"))
            else:
                report.add("annotation of an unknown image skipped", where)
            continue
        annotations[image_id].append(ann)

    records = []
    for image_id, image in images.items():
        file_name = image.get("file_name")
        where = f"{annotation_file} image id {image_id} ({file_name})"
        try:
            rel = resolve_image_path(image_root, file_name, where)
            path = os.path.join(image_root, *rel.split("/"))
            width = _declared_size(image, "width", where)
            height = _declared_size(image, "height", where)
            if width and height:
                check_image_pixels(height, width, where, max_image_pixels)
            if check_images != "none":
                expected = (height, width) if width and height else None
                height, width = check_image(path, expected, check_images, where,
                                            max_image_pixels=max_image_pixels)
            elif not (width and height):
                raise BadInputError(f"{where}: no width/height in the JSON and check_images='none'")
            record = _record(image_id, rel, int(width), int(height), annotations.get(image_id, []),
                             label_of, where, on_bad, report, load_masks)
        except FatalInputError:
            raise
        except BadInputError as exc:
            if on_bad == "error":
                report.collect(exc)  # go on: the error lists every bad record, not the first
            else:
                report.add("missing, unreadable or wrong-size image skipped", where)
            continue
        if record is None or (skip_empty and record.num_objects == 0):
            continue
        records.append(record)
    report.raise_collected()
    report.warn()
    return CocoDetectionDataset(records, class_names, image_root, category_ids, report,
                                annotation_file=annotation_file)


def _is_id(value, *also) -> bool:
    # bool is an int to Python but never a COCO id; floats like 1.5 would collide after int().
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, also)


def _list_of_dicts(data, key, annotation_file, required=True):
    items = data.get(key, None if required else [])
    if not isinstance(items, list):
        raise BadInputError(f"{annotation_file}: '{key}' is {type(items).__name__}, not a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadInputError(f"{annotation_file}: '{key}' entry {i} is {type(item).__name__}, "
                                "not an object")
    return items


def _declared_size(image, key, where):
    """The JSON's width / height as an int, None when absent or 0 (then the image header says)."""
    value = image.get(key)
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value:
        raise BadInputError(f"{where}: {key} {value!r} is not a number")
    if value < 0 or value != int(value) or value > 2 ** 31 - 1:
        raise BadInputError(f"{where}: {key} {value!r} is not a usable image size")
    return int(value)


def _record(image_id, rel, width, height, anns, label_of, where, on_bad, report, load_masks):
    boxes, labels, crowd, segs, object_ids = [], [], [], [], []
    for ann in anns:
        ann_where = f"{where} annotation {ann.get('id')}"
        category = ann.get("category_id")
        bbox = ann.get("bbox")
        problem = reason = None
        if not _is_id(category) or category not in label_of:
            problem, reason = f"unknown category id {category!r}", "unknown category skipped"
        elif (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
              or not all(v is None or isinstance(v, float)
                         or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 10 ** 300)
                         for v in bbox)):
            problem = f"malformed bbox {bbox!r} (want [x, y, width, height])"
            reason = "malformed bbox skipped"
        if problem:
            if on_bad == "error":
                raise BadInputError(f"{ann_where}: {problem}")
            report.add(reason, ann_where)
            continue
        x, y, w, h = (float("nan") if v is None else float(v) for v in bbox)
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[category])
        crowd.append(bool(ann.get("iscrowd", 0)))
        segs.append(ann.get("segmentation") or None)
        object_ids.append(f"{len(object_ids)} (annotation {ann.get('id')})")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    clipped, keep = sanitize_boxes(boxes, width, height, where, report, object_ids)
    record = DetectionRecord(image_id=image_id, image_path=rel, width=width, height=height,
                             boxes=clipped, labels=labels, iscrowd=crowd,
                             masks=segs if load_masks else None)
    return record.select(keep)
