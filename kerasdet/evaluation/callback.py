"""Evaluate a detector on a tf.data dataset: a plain function and a Keras callback for ``fit``.

The dataset yields the batch dicts of the input pipeline (``images`` [B, H, W, 3],
``bounding_boxes`` = {``boxes`` [B, N, 4], ``labels`` [B, N] padded with -1, optional
``difficult`` / ``iscrowd`` [B, N]}, optional ``masks`` [B, N, H, W]). The model's predict output is
the dict ``boxes`` [B, K, 4], ``scores`` [B, K], ``classes`` [B, K], ``num_detections`` [B], optional
``masks`` [B, K, H, W] (or per-box grids [B, K, M, M], pasted into the boxes). Both sides are
turned into per-image dicts without padding and scored with ``voc_evaluate`` and / or
``coco_evaluate``; boxes are compared in network-input pixels.
"""
import math

import keras
import numpy as np

from kerasdet.evaluation.coco import coco_evaluate, encode_masks
from kerasdet.evaluation.masks import paste_masks
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


def evaluate_model(model, dataset, metrics=("voc", "coco"), class_names=None, iou_threshold=0.5,
                   use_07_metric=False, coco_iou_types=None, max_batches=None, predict_fn=None,
                   mask_threshold=0.5, verbose=False):
    """Run a detector over a dataset and score it.

    Args:
      model: a Keras detector whose ``predict_on_batch(images)`` returns the predict dict.
      dataset: iterable of batch dicts (e.g. a ``tf.data.Dataset``).
      metrics: any of "voc" (``voc_evaluate``) and "coco" (``coco_evaluate``).
      class_names: optional names, indexed by class id.
      iou_threshold, use_07_metric: passed to ``voc_evaluate``.
      coco_iou_types: "bbox" / "segm"; default: "bbox", plus "segm" when both the predictions and
        the ground truth carry masks.
      max_batches: stop after this many batches (None: the whole dataset).
      predict_fn: optional ``callable(model, batch) -> predict dict`` for models whose predict
        needs more than the images.
      mask_threshold: predicted (and ground-truth) masks are binarized with ``mask >= threshold``.
      verbose: let pycocotools print.

    Returns:
      {"voc": voc result, "coco": {iou_type: metrics}, "num_images": int} (only the asked parts).
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    for name in metrics:
        if name not in _METRICS:
            raise ValueError(f"metrics entries must be one of {_METRICS}, got {name!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    predict_fn = predict_fn or _default_predict
    detections, ground_truths = [], []
    for step, batch in enumerate(dataset):
        if max_batches is not None and step >= max_batches:
            break
        gts = batch_to_ground_truths(batch)
        image_size = gts[0]["image_size"] if gts else None
        dets = predictions_to_dicts(predict_fn(model, batch), image_size)
        if len(dets) != len(gts):
            raise ValueError(f"batch {step}: the model returned {len(dets)} images for {len(gts)} inputs")
        for record in dets + gts:
            # Image-sized masks of a whole validation set do not fit in memory; their RLE does.
            if record.get("masks") is not None:
                record["masks"] = encode_masks(record["masks"], mask_threshold)
        detections += dets
        ground_truths += gts
    if not ground_truths:
        raise ValueError("the evaluation dataset yielded no images")
    results = {"num_images": len(ground_truths)}
    if "voc" in metrics:
        results["voc"] = voc_evaluate(detections, ground_truths, iou_threshold, use_07_metric, class_names)
    if "coco" in metrics:
        if coco_iou_types is None:
            has_masks = (all(d.get("masks") is not None for d in detections)
                         and all(g.get("masks") is not None for g in ground_truths))
            coco_iou_types = ("bbox", "segm") if has_masks else ("bbox",)
        results["coco"] = coco_evaluate(detections, ground_truths, iou_types=coco_iou_types,
                                        class_names=class_names, verbose=verbose)
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
        mask_threshold: as ``evaluate_model``.
      prefix: prefix of the log keys.
      print_table: print ``format_metrics_table`` after each evaluation.
      verbose: let pycocotools print.
    """

    def __init__(self, dataset, every_n_epochs=1, metrics=("voc", "coco"), class_names=None,
                 iou_threshold=0.5, use_07_metric=False, coco_iou_types=None, max_batches=None,
                 predict_fn=None, mask_threshold=0.5, prefix="val_", print_table=True, verbose=False):
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.dataset = dataset
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
            predict_fn=self.predict_fn, mask_threshold=self.mask_threshold, verbose=self.verbose)
        self.last_results = results
        flat = metrics_to_logs(results, self.prefix)
        if logs is not None:
            logs.update(flat)
        if self.print_table:
            summary = ", ".join(f"{k} {v:.4f}" for k, v in flat.items() if not math.isnan(v))
            print(f"\nEpoch {epoch + 1} evaluation on {results['num_images']} images: {summary}")
            print(format_metrics_table(results, self.class_names))
