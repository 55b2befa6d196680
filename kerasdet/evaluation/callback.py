"""Evaluate a detector on a tf.data dataset: a plain function and a Keras callback for ``fit``.

The dataset yields the batch dicts of the input pipeline (``images`` [B, H, W, 3],
``bounding_boxes`` = {``boxes`` [B, N, 4], ``labels`` [B, N] padded with -1, optional
``difficult`` / ``iscrowd`` [B, N]}, optional ``masks`` (image-sized [B, N, H, W] or per-instance
grids [B, N, M, M] cropped to each box), ``image_info`` [B, 6] and ``image_index`` [B]). The
model's predict output is the dict ``boxes`` [B, K, 4], ``scores`` [B, K], ``classes`` [B, K],
``num_detections`` [B], optional ``masks`` [B, K, H, W] (or per-box grids [B, K, M, M]).

Scores are computed in the original image's pixels, as published numbers are: predicted boxes are
divided by the scale in ``image_info`` and masks pasted at the original size. The ground truth is
either the batch's, mapped back the same way (exact when evaluation has no geometric augmentation),
or, given ``records`` (the DetectionDataset the pipeline was built from), each image's record in
its own pixels. Records read from a COCO annotation file are scored by pycocotools against that
file itself (its image ids, areas and crowd flags).
"""
import math

import keras
import numpy as np

from kerasdet.data.masks import masks_for_record
from kerasdet.data.records import DetectionDataset
from kerasdet.data.resize import boxes_to_original
from kerasdet.evaluation.coco import coco_evaluate, save_coco_results
from kerasdet.evaluation.masks import masks_to_original_rles, paste_masks
from kerasdet.evaluation.table import format_metrics_table
from kerasdet.evaluation.voc import voc_evaluate

__all__ = ["EvaluationCallback", "evaluate_model", "predictions_to_dicts", "batch_to_ground_truths",
           "metrics_to_logs"]

_METRICS = ("voc", "coco")
# The COCO numbers that go into the logs (all twelve would crowd the progress bar; the full set
# stays in the results dict).
_LOGGED_COCO = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _numpy(value):
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def predictions_to_dicts(outputs, image_size=None):
    """Split a batch of padded predictions into per-image dicts, keeping the first num_detections.

    Rows beyond ``num_detections`` are padding; rows with a negative class are dropped too (some
    NMS implementations pad with -1 as well). When ``image_size`` (height, width) is given and the
    predicted masks are per-box grids of another size (e.g. 28 x 28), they are pasted into
    image-sized masks with ``paste_masks``.
    """
    if not isinstance(outputs, dict):
        raise TypeError(f"model predictions must be a dict with boxes / scores / classes / num_detections, "
                        f"got {type(outputs).__name__}")
    for key in ("boxes", "scores", "classes", "num_detections"):
        if key not in outputs:
            raise KeyError(f"model predictions have no {key!r} entry (keys: {sorted(outputs)})")
    boxes = _numpy(outputs["boxes"])
    scores = _numpy(outputs["scores"])
    classes = _numpy(outputs["classes"])
    counts = _numpy(outputs["num_detections"]).reshape(-1)
    masks = _numpy(outputs["masks"]) if outputs.get("masks") is not None else None
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"predictions['boxes'] must be [B, K, 4], got {boxes.shape}")
    batch, k = boxes.shape[:2]
    for key, value in (("scores", scores), ("classes", classes)):
        if value.shape != (batch, k):
            raise ValueError(f"predictions[{key!r}] must be [{batch}, {k}] like 'boxes', got {value.shape}")
    if counts.shape[0] != batch:
        raise ValueError(f"predictions['num_detections'] must be [{batch}], got {counts.shape}")
    if masks is not None and masks.shape[:2] != (batch, k):
        raise ValueError(f"predictions['masks'] must be [{batch}, {k}, H, W], got {masks.shape}")
    per_image = []
    for b in range(batch):
        n = int(np.clip(counts[b], 0, k))
        keep = np.flatnonzero(classes[b, :n] >= 0)
        record = {"boxes": boxes[b, keep], "scores": scores[b, keep], "classes": classes[b, keep]}
        if masks is not None:
            record["masks"] = masks[b, keep]
            if image_size is not None and tuple(record["masks"].shape[1:]) != tuple(image_size):
                record["masks"] = paste_masks(record["masks"], record["boxes"], image_size)
        per_image.append(record)
    return per_image


def _split_batch(batch):
    """(images, bounding_boxes dict, masks or None) from a batch dict or an (inputs, targets) pair."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
        images = inputs["images"] if isinstance(inputs, dict) else inputs
        boxes = targets.get("bounding_boxes", targets) if isinstance(targets, dict) else None
        masks = targets.get("masks") if isinstance(targets, dict) else None
    elif isinstance(batch, dict):
        images, boxes, masks = batch.get("images"), batch.get("bounding_boxes"), batch.get("masks")
    else:
        raise TypeError(f"a dataset element must be a batch dict (images, bounding_boxes) or an "
                        f"(inputs, targets) pair, got {type(batch).__name__}")
    if images is None or not isinstance(boxes, dict) or "boxes" not in boxes or "labels" not in boxes:
        raise ValueError("a dataset element must provide 'images' and 'bounding_boxes' with 'boxes' and "
                         "'labels' (see DESIGN.md's batch dict)")
    if masks is None:
        masks = boxes.get("masks")
    return images, boxes, masks


def batch_to_ground_truths(batch):
    """Per-image ground-truth dicts from one batch, dropping padding rows (label -1)."""
    images, bounding_boxes, masks = _split_batch(batch)
    image_shape = tuple(int(d) for d in images.shape[1:3])
    boxes = _numpy(bounding_boxes["boxes"])
    labels = _numpy(bounding_boxes["labels"])
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2]:
        raise ValueError(f"bounding_boxes must be boxes [B, N, 4] and labels [B, N], got {boxes.shape} "
                         f"and {labels.shape}")
    extras = {key: _numpy(bounding_boxes[key]) for key in ("difficult", "iscrowd")
              if bounding_boxes.get(key) is not None}
    masks = _numpy(masks) if masks is not None else None
    per_image = []
    for b in range(boxes.shape[0]):
        keep = np.flatnonzero(labels[b] >= 0)
        record = {"boxes": boxes[b, keep], "classes": labels[b, keep], "image_size": image_shape}
        for key, value in extras.items():
            record[key] = value[b, keep].astype(bool)
        if masks is not None:
            record["masks"] = masks[b, keep]
        per_image.append(record)
    return per_image


def _default_predict(model, batch):
    images, _, _ = _split_batch(batch)
    # predict_on_batch goes through the model's own (compiled, cached) predict function, exactly
    # what model.predict does per batch, so a detector's predict_step (decode + NMS) is used.
    # kerasdet detectors name the batch entries they predict from (`image_info` to clip boxes to
    # each unpadded image, Fast R-CNN's `proposals`).
    keys = getattr(model, "predict_input_keys", None)
    if keys and isinstance(batch, dict):
        return model.predict_on_batch({k: batch[k] for k in keys if k in batch})
    return model.predict_on_batch(images)


def _batch_entry(batch, key):
    """A batch entry by name, from a batch dict or an (inputs, targets) pair; None when absent."""
    if isinstance(batch, dict):
        return batch.get(key)
    for part in batch[:2]:
        if isinstance(part, dict) and part.get(key) is not None:
            return part[key]
    return None


def _image_frames(batch, count, records):
    """Per image of a batch: (image_info row float64 [6], record index or None).

    Without ``image_info`` the network input is the original image (scale 1, canvas-sized).
    """
    images, _, _ = _split_batch(batch)
    canvas = tuple(int(d) for d in images.shape[1:3])
    info = _batch_entry(batch, "image_info")
    index = _batch_entry(batch, "image_index")
    if records is not None and (info is None or index is None):
        raise ValueError("evaluating against records needs the batch entries 'image_info' and "
                         "'image_index' (kerasdet.data.pipeline.build_dataset provides both)")
    if info is None:
        info = np.tile([canvas[0], canvas[1], 1.0, 1.0, canvas[0], canvas[1]], (count, 1))
    info = _numpy(info).astype(np.float64)
    if info.shape != (count, 6):
        raise ValueError(f"image_info must be [{count}, 6], got {info.shape}")
    indices = [None] * count if index is None else [int(i) for i in _numpy(index).reshape(-1)]
    if len(indices) != count:
        raise ValueError(f"image_index must be [{count}], got {len(indices)} entries")
    return canvas, info, indices


def _to_original(record, info, canvas, threshold):
    """A detection or batch ground-truth dict moved from the network input to original pixels."""
    out = dict(record)
    out["boxes"] = boxes_to_original(np.asarray(record["boxes"], np.float64).reshape(-1, 4), info)
    out["image_size"] = (int(round(info[0])), int(round(info[1])))
    if record.get("masks") is not None:
        out["masks"] = masks_to_original_rles(record["masks"], out["boxes"], info, canvas, threshold)
    return out


def _record_ground_truth(records, index, info, with_masks, threshold):
    """The ground truth of record ``index`` in its own pixels, checked against the batch's size."""
    if not 0 <= index < len(records):
        raise IndexError(f"image_index {index} is outside the {len(records)} records given")
    record = records[index]
    size = (int(round(info[0])), int(round(info[1])))
    if size != (record.height, record.width):
        raise ValueError(
            f"image_index {index} names record {record.image_id!r} ({record.image_path}) of size "
            f"{record.height}x{record.width}, but the batch's image_info says {size[0]}x{size[1]}: "
            "records must be the data set the evaluation pipeline was built from, without "
            "geometric augmentation")
    gt = {"boxes": record.boxes, "classes": record.labels, "difficult": record.difficult,
          "iscrowd": record.iscrowd, "image_size": size, "image_id": record.image_id}
    if with_masks:
        gt["masks"] = _encode(masks_for_record(record), threshold)
    return gt


def _collect(model, dataset, predict_fn, max_batches, records, threshold):
    """(detections, ground truths): per-image dicts in original pixels, each with its image_id."""
    # The masks of COCO records are scored from the annotation file; only other records need them.
    record_masks = (records is not None and records.has_masks
                    and getattr(records, "annotation_file", None) is None)
    detections, ground_truths = [], []
    for step, batch in enumerate(dataset):
        if max_batches is not None and step >= max_batches:
            break
        gts = batch_to_ground_truths(batch)
        dets = predictions_to_dicts(predict_fn(model, batch))
        if len(dets) != len(gts):
            raise ValueError(f"batch {step}: the model returned {len(dets)} images for {len(gts)} inputs")
        canvas, info, indices = _image_frames(batch, len(gts), records)
        for b, (det, gt) in enumerate(zip(dets, gts)):
            if records is not None:
                gt = _record_ground_truth(records, indices[b], info[b], record_masks, threshold)
            else:
                gt = _to_original(gt, info[b], canvas, threshold)
                gt["image_id"] = len(ground_truths) + 1
            det = _to_original(det, info[b], canvas, threshold)
            det["image_id"] = gt["image_id"]
            detections.append(det)
            ground_truths.append(gt)
    if not ground_truths:
        raise ValueError("the evaluation dataset yielded no images")
    return detections, ground_truths


def _check_records(records):
    if records is not None and not isinstance(records, DetectionDataset):
        raise TypeError("records must be the kerasdet DetectionDataset the evaluation pipeline was "
                        f"built from, got {type(records).__name__}")
    return records


def _coco_ground_truth_args(ground_truths, records):
    """coco_evaluate's ground-truth arguments: the annotation file of COCO records (scored by
    pycocotools as published numbers are), else the per-image dicts in original pixels."""
    image_ids = [g["image_id"] for g in ground_truths]
    annotation_file = getattr(records, "annotation_file", None)
    if annotation_file is not None:
        category_ids = {label: records.label_to_category_id(label) for label in range(records.num_classes)}
        return {"coco_gt": annotation_file, "category_ids": category_ids, "image_ids": image_ids}
    return {"ground_truths": ground_truths, "image_ids": image_ids}


def evaluate_model(model, dataset, metrics=("voc", "coco"), class_names=None, iou_threshold=0.5,
                   use_07_metric=False, coco_iou_types=None, max_batches=None, predict_fn=None,
                   mask_threshold=0.5, verbose=False, records=None, detections_file=None):
    """Run a detector over a dataset and score it in the original images' pixels.

    Args:
      model: a Keras detector whose ``predict_on_batch(images)`` returns the predict dict.
      dataset: iterable of batch dicts (e.g. a ``tf.data.Dataset``).
      metrics: any of "voc" (``voc_evaluate``) and "coco" (``coco_evaluate``).
      class_names: optional names, indexed by class id (default: the records' class names).
      iou_threshold, use_07_metric: passed to ``voc_evaluate``.
      coco_iou_types: "bbox" / "segm"; default: "bbox", plus "segm" when both the predictions and
        the ground truth carry masks.
      max_batches: stop after this many batches (None: the whole dataset).
      predict_fn: optional ``callable(model, batch) -> predict dict`` for models whose predict
        needs more than the images.
      mask_threshold: predicted (and ground-truth) masks are binarized with ``mask >= threshold``.
      verbose: let pycocotools print.
      records: optional DetectionDataset the pipeline was built from: each image's ground truth is
        its record (by ``image_index``) in original pixels; COCO records are scored against their
        annotation file. Without it the batch's ground truth is mapped back with ``image_info``.
      detections_file: optional path: the detections as a COCO results JSON (original image ids,
        category ids and pixels; ``segmentation`` RLE with masks), the very list the COCO scores
        come from.

    Returns:
      {"voc": voc result, "coco": {iou_type: metrics}, "num_images": int} (only the asked parts).
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for name in metrics:
        if name not in _METRICS:
            raise ValueError(f"metrics entries must be one of {_METRICS}, got {name!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    records = _check_records(records)
    if class_names is None and records is not None:
        class_names = records.class_names
    detections, ground_truths = _collect(model, dataset, predict_fn or _default_predict, max_batches,
                                         records, mask_threshold)
    results = {"num_images": len(ground_truths)}
    if "voc" in metrics:
        results["voc"] = voc_evaluate(detections, ground_truths, iou_threshold, use_07_metric, class_names)
    if coco_iou_types is None:
        gt_masks = records.has_masks if records is not None else all(
            g.get("masks") is not None for g in ground_truths)
        has_masks = gt_masks and all(d.get("masks") is not None for d in detections)
        coco_iou_types = ("bbox", "segm") if has_masks else ("bbox",)
    gt_args = _coco_ground_truth_args(ground_truths, records)
    if "coco" in metrics:
        results["coco"] = coco_evaluate(detections, iou_types=coco_iou_types, class_names=class_names,
                                        verbose=verbose, results_file=detections_file, **gt_args)
    elif detections_file is not None:
        save_coco_results(detections, detections_file, gt_args["image_ids"], gt_args.get("category_ids"),
                          coco_iou_types)
    return results


def metrics_to_logs(results, prefix="val_"):
    """Flatten ``evaluate_model`` results to scalar log entries such as ``val_voc_map50``,
    ``val_coco_ap``, ``val_coco_ap50``, ``val_coco_mask_ap``."""
    logs = {}
    voc = results.get("voc")
    if voc is not None:
        suffix = "07" if voc.get("metric") == "voc07_11point" else ""
        logs[f"{prefix}voc{suffix}_map{int(round(100 * voc['iou_threshold']))}"] = voc["mAP"]
    for iou_type, values in (results.get("coco") or {}).items():
        stem = f"{prefix}coco_" + ("mask_" if iou_type == "segm" else "")
        for name in _LOGGED_COCO:
            logs[stem + name.lower()] = values[name]
    return logs


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluate detection metrics at the end of every ``every_n_epochs``-th epoch.

    The metrics go into ``logs`` (e.g. ``val_voc_map50``, ``val_coco_ap``), so callbacks listed
    after this one (ModelCheckpoint(monitor="val_coco_ap", mode="max"), TensorBoard, History) see
    them. The last full results are kept in ``self.last_results``.

    Args:
      dataset: the validation tf.data dataset of batch dicts.
      every_n_epochs: evaluate when (epoch + 1) is a multiple of this.
      metrics, class_names, iou_threshold, use_07_metric, coco_iou_types, max_batches, predict_fn,
        mask_threshold, records: as ``evaluate_model`` (scores in original image pixels; with
        ``records``, against each record's ground truth or the COCO annotation file).
      prefix: prefix of the log keys.
      print_table: print ``format_metrics_table`` after each evaluation.
      verbose: let pycocotools print.
    """

    def __init__(self, dataset, every_n_epochs=1, metrics=("voc", "coco"), class_names=None,
                 iou_threshold=0.5, use_07_metric=False, coco_iou_types=None, max_batches=None,
                 predict_fn=None, mask_threshold=0.5, prefix="val_", print_table=True, verbose=False,
                 records=None):
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.dataset = dataset
        self.records = _check_records(records)
        self.every_n_epochs = every_n_epochs
        self.metrics = metrics
        self.class_names = class_names
        self.iou_threshold = iou_threshold
        self.use_07_metric = use_07_metric
        self.coco_iou_types = coco_iou_types
        self.max_batches = max_batches
        self.predict_fn = predict_fn
        self.mask_threshold = mask_threshold
        self.prefix = prefix
        self.print_table = print_table
        self.verbose = verbose
        self.last_results = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        results = evaluate_model(
            self.model, self.dataset, metrics=self.metrics, class_names=self.class_names,
            iou_threshold=self.iou_threshold, use_07_metric=self.use_07_metric,
            coco_iou_types=self.coco_iou_types, max_batches=self.max_batches,
            predict_fn=self.predict_fn, mask_threshold=self.mask_threshold, verbose=self.verbose,
            records=self.records)
        self.last_results = results
        flat = metrics_to_logs(results, self.prefix)
        if logs is not None:
            logs.update(flat)
        if self.print_table:
            summary = ", ".join(f"{k} {v:.4f}" for k, v in flat.items() if not math.isnan(v))
            print(f"\nEpoch {epoch + 1} evaluation on {results['num_images']} images: {summary}")
            print(format_metrics_table(results, self.class_names))
