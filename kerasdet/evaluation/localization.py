"""Localization metrics of the ILSVRC kind (OverFeat, section 4): images holding exactly one object;
the model names its top classes, each with one box, and a guess is right when its class is the
object's and its box overlaps the object's by IoU >= 0.5.

    top1 / top5                 the object's class is the first / among the first five guesses
    localization_top1 / _top5   one of the first one / five guesses has the right class and box
    mean_iou                    IoU of the first guess's box with the object (0 without a box)

A model with a `classify(images, ...)` method (OverFeat) ranks classes with it; any other detector
ranks them by their best detection score. A class's box is its highest-scoring detection.
"""
import numpy as np
import tensorflow as tf

from kerasdet.numpy_boxes import pairwise_iou_numpy

__all__ = ["evaluate_localization", "localization_guesses"]


def localization_guesses(class_scores, boxes, scores, classes, top_k=5):
    """One image's ranked guesses [(class, box or None)] from its class scores [K] and detections."""
    guesses = []
    for label in np.argsort(-np.asarray(class_scores), kind="stable")[:top_k]:
        hits = np.flatnonzero(classes == label)
        best = hits[np.argmax(scores[hits])] if len(hits) else None
        guesses.append((int(label), None if best is None else np.asarray(boxes[best], np.float64)))
    return guesses


def _class_scores_from_detections(scores, classes, num_classes):
    ranked = np.zeros(num_classes)
    for score, label in zip(scores, classes):
        if 0 <= label < num_classes:
            ranked[label] = max(ranked[label], score)
    return ranked


def evaluate_localization(model, dataset, iou_threshold=0.5, top_k=5, **protocol):
    """Localization metrics of `model` on the batches of `dataset` (kerasdet.data.build_dataset
    batches without training augmentation). `protocol` (scales=, fine_stride=, flips=) is passed to
    the model's `classify` and `detect` where they take it (OverFeat's table-2 rows).

    Images whose ground truth holds other than one object are counted in `skipped`, not scored."""
    num_classes = int(model.num_classes)
    detect_kwargs = {k: v for k, v in protocol.items() if k in ("scales", "fine_stride")}
    if detect_kwargs:
        run_detect = tf.function(lambda images, shapes: model.detect(images, shapes, **detect_kwargs),
                                 reduce_retracing=True)
    classify = getattr(model, "classify", None)
    if classify is not None:
        run_classify = tf.function(lambda images: classify(images, **protocol), reduce_retracing=True)
    top1, topk, loc1, lock, ious, skipped = [], [], [], [], [], 0
    for batch in dataset:
        labels = batch["bounding_boxes"]["labels"].numpy()
        gt_boxes = batch["bounding_boxes"]["boxes"].numpy()
        if detect_kwargs:
            shapes = batch["image_info"][:, 4:6]
            out = {k: v.numpy() for k, v in run_detect(model.input_images(batch), shapes).items()}
        else:
            out = model.predict_on_batch({k: batch[k] for k in model.predict_input_keys})
        if classify is not None:
            # classify sees each image without the batch's padding
            heights, widths = batch["image_info"][:, 4].numpy(), batch["image_info"][:, 5].numpy()
        for b in range(len(labels)):
            real = np.flatnonzero(labels[b] >= 0)
            if len(real) != 1:
                skipped += 1
                continue
            label, truth = int(labels[b, real[0]]), gt_boxes[b, real[0]][None].astype(np.float64)
            keep = out["classes"][b] >= 0
            boxes, scores, classes = out["boxes"][b][keep], out["scores"][b][keep], out["classes"][b][keep]
            if classify is not None:
                image = batch["images"][b:b + 1, :int(round(heights[b])), :int(round(widths[b]))]
                class_scores = run_classify(image).numpy()[0]
            else:
                class_scores = _class_scores_from_detections(scores, classes, num_classes)
            guesses = localization_guesses(class_scores, boxes, scores, classes, top_k)
            overlaps = [0.0 if box is None else float(pairwise_iou_numpy(box[None], truth)[0, 0])
                        for _, box in guesses]
            right = [g == label and iou >= iou_threshold for (g, _), iou in zip(guesses, overlaps)]
            top1.append(guesses[0][0] == label)
            topk.append(any(g == label for g, _ in guesses))
            loc1.append(right[0])
            lock.append(any(right))
            ious.append(overlaps[0])
    if not top1:
        raise ValueError("evaluate_localization: no image of the data set holds exactly one object")
    mean = lambda values: float(np.mean(values))  # noqa: E731
    return {"images": len(top1), "skipped": skipped, "top1": mean(top1), f"top{top_k}": mean(topk),
            "localization_top1": mean(loc1), f"localization_top{top_k}": mean(lock),
            "mean_iou": mean(ious)}
