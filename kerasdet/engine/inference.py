"""A trained detector on data: scores on a validation set (metrics.json, the COCO detections file)
and drawn detections on image files."""
import glob
import json
import math
import os

import numpy as np
import tensorflow as tf

from kerasdet.data.images import read_image
from kerasdet.data.masks import segmentation_to_mask
from kerasdet.data.resize import ResizeRule, boxes_to_original
from kerasdet.evaluation import evaluate_model, format_metrics_table
from kerasdet.evaluation.masks import masks_to_original_rles
from kerasdet.visualize import draw_detections, save_png

__all__ = ["metrics_summary", "evaluate_detector", "predict_images", "IMAGE_SUFFIXES", "expand_image_paths"]


def metrics_summary(results):
    """{"voc_map50", "coco_ap", "coco_ap50", "coco_ap75", "num_images"} from evaluate_model output."""
    summary = {"num_images": results.get("num_images")}
    if "voc" in results:
        summary["voc_map50"] = float(results["voc"]["mAP"])
    if "coco" in results:
        bbox = results["coco"]["bbox"]
        summary.update(coco_ap=float(bbox["AP"]), coco_ap50=float(bbox["AP50"]),
                       coco_ap75=float(bbox["AP75"]))
        if "segm" in results["coco"]:
            summary["coco_mask_ap"] = float(results["coco"]["segm"]["AP"])
    return summary


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def evaluate_detector(model, val_ds, class_names=None, out_dir=None, with_masks=False, quiet=False,
                      records=None, split="val"):
    """VOC mAP@0.5 and COCO AP on a dataset, scored in the original images' pixels; prints the
    table, writes OUT/metrics.json and OUT/detections_<split>.json (COCO results format).

    ``records``: the DetectionDataset ``val_ds`` was built from; its ground truth (and, for COCO, its
    annotation file) is what the detections are scored against.
    """
    detections_file = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        detections_file = os.path.join(out_dir, f"detections_{split}.json")
    results = evaluate_model(model, val_ds, metrics=("voc", "coco"), class_names=class_names,
                             records=records, detections_file=detections_file)
    summary = metrics_summary(results)
    if not quiet:
        print(format_metrics_table(results, class_names))
        print(f"VOC mAP@0.5 {summary['voc_map50']:.4f}   COCO AP {summary['coco_ap']:.4f}")
    if out_dir:
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(_jsonable({**summary, "results": results}), handle, indent=2, sort_keys=True)
    return summary


def _proposals_in_input(boxes, info, max_proposals):
    """[1, max_proposals, 4] float32: an image's proposals (original pixels) in network-input pixels
    (the pipeline's layout: scaled like the boxes, clipped to the resized image, zero rows pad)."""
    boxes = np.asarray(boxes, np.float32)[:max_proposals]
    info = np.asarray(info, np.float32)
    boxes = boxes * np.array([info[3], info[2], info[3], info[2]], np.float32)
    boxes = np.clip(boxes, 0.0, [info[5], info[4], info[5], info[4]])
    padded = np.zeros([1, max_proposals, 4], np.float32)
    padded[0, :len(boxes)] = boxes
    return padded


def predict_images(model, image_paths, out_dir, class_names=None, score_threshold=0.3,
                   input_settings=None, proposals=None, max_proposals=2000):
    """Runs the detector on image files; writes OUT/<stem>.png with the boxes (and masks) drawn and
    OUT/detections.json (boxes in the original image's pixels; a mask model's detections carry their
    mask as a COCO RLE "segmentation" at the image's size). Returns the JSON records.

    ``proposals``: for detectors on external proposals, a proposal cache (kerasdet.data.proposals;
    an image's entry is the one cached for its file name, or its stem as the image id), or a method
    name ("selective_search", "edge_boxes") to compute each image's proposals here."""
    from kerasdet.data import proposals as proposal_source

    if isinstance(proposals, str) and proposals in proposal_source.METHODS:
        method = proposals
        proposals_of = lambda path, image: proposal_source.compute_proposals(  # noqa: E731
            image, method, max_proposals=max_proposals)
    elif proposals is not None:
        cache = proposal_source.load_proposal_cache(proposals)
        proposals_of = lambda path, image: cache.for_file(path)  # noqa: E731
    settings = input_settings or getattr(model, "input_settings", None)
    if not settings:
        raise ValueError("the model carries no input settings (it was not made by kerasdet.zoo.load or "
                         "a kerasdet run): pass input_settings={'min_size': ..., 'max_size': ...}")
    rule = ResizeRule.from_settings(settings)
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for path in image_paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path!r} does not exist")
        image = read_image(path)
        canvas, info = rule.prepare(tf.constant(image))
        inputs = {"images": canvas[None], "image_info": info[None]}
        if proposals is not None:
            inputs["proposals"] = _proposals_in_input(proposals_of(path, image), info.numpy(), max_proposals)
        out = model.predict_on_batch(inputs)
        n = int(np.asarray(out["num_detections"])[0])
        boxes = boxes_to_original(np.asarray(out["boxes"])[0, :n], info.numpy())
        scores = np.asarray(out["scores"])[0, :n]
        classes = np.asarray(out["classes"])[0, :n]
        keep = scores >= score_threshold
        segmentations = image_masks = None
        if out.get("masks") is not None:  # instance masks: COCO RLEs in the photo's pixels, and drawn
            segmentations = masks_to_original_rles(np.asarray(out["masks"])[0, :n][keep], boxes[keep],
                                                   info.numpy(), tuple(canvas.shape[:2]))
            height, width = image.shape[:2]
            image_masks = (np.stack([segmentation_to_mask(rle, height, width) for rle in segmentations])
                           if segmentations else None)
        picture = draw_detections(image, boxes[keep], classes[keep], scores[keep], masks=image_masks,
                                  class_names=class_names)
        stem = os.path.splitext(os.path.basename(path))[0]
        png = os.path.join(out_dir, f"{stem}.png")
        save_png(picture, png)
        detections = [{"box_xyxy": [float(v) for v in boxes[i]], "score": float(scores[i]),
                       "class_id": int(classes[i]),
                       "class_name": class_names[int(classes[i])] if class_names else None}
                      for i in np.flatnonzero(keep)]
        for detection, rle in zip(detections, segmentations or ()):
            detection["segmentation"] = rle
        records.append({"image": path, "output": png, "detections": detections})
    with open(os.path.join(out_dir, "detections.json"), "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=2)
    return records


# What `kerasdet predict FOLDER` picks up: the formats kerasdet.data.images reads.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def expand_image_paths(items):
    """Image files from files, folders (their images, not recursive) and glob patterns, in the
    given order, each file once; anything that names no image is an error naming it."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if name.lower().endswith(IMAGE_SUFFIXES)
                           and os.path.isfile(os.path.join(item, name)))
            if not found:
                raise FileNotFoundError(f"folder {item!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        elif os.path.isfile(item):
            found = [item]
        elif any(char in item for char in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"pattern {item!r} matches no file")
        else:
            raise FileNotFoundError(f"image {item!r} does not exist")
        paths.extend(p for p in found if p not in paths)
    stems = {}
    for path in paths:  # the PNGs are named by stem: two inputs must not write the same file
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise ValueError(f"images {stems[stem]!r} and {path!r} would both be written as {stem}.png; "
                             "predict them into separate --out folders")
        stems[stem] = path
    return paths
