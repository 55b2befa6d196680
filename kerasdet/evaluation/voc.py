"""Pascal VOC average precision: 11-point (VOC2007) and all-point (VOC2010 and later).

Definitions (Padilla et al.'s survey of detection metrics, and the VOC development kit):

- detections of a class, from all images, are taken in order of descending score; each is matched
  to the ground truth of its image with the highest IoU. IoU >= threshold and that ground truth not
  yet taken: true positive; otherwise false positive (duplicates are false positives). A detection
  whose best ground truth is ``difficult`` is ignored: neither true nor false positive, and
  difficult objects do not count among the positives.
- precision P = TP / (TP + FP) and recall R = TP / #positives after each detection;
- P_interp(R) = max over R' >= R of P(R');
- AP_11 = mean of P_interp(R) over R in {0, 0.1, ..., 1};
- AP_all = sum_n (R_{n+1} - R_n) P_interp(R_{n+1}): area under the interpolated step curve.

Boxes use continuous coordinates: area = (x2 - x1) * (y2 - y1), without the devkit's +1. The
match test is IoU >= threshold, as in the MATLAB devkit (VOCevaldet) and pycocotools.
"""
import numpy as np

from kerasdet.evaluation._inputs import check_detections, check_ground_truths, check_same_length
from kerasdet.numpy_boxes import pairwise_iou_numpy

__all__ = ["voc_ap", "voc_evaluate"]


def voc_ap(recall, precision, use_07_metric=False):
    """Average precision of one class from its cumulative recall / precision lists.

    Args:
      recall: 1-D array, recall after each detection in descending-score order (non-decreasing).
      precision: 1-D array of the same length, precision after each detection.
      use_07_metric: True for the VOC2007 11-point AP, False for the all-point AP (VOC2010+).

    Returns:
      AP as a Python float; 0.0 when there are no detections.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.ndim != 1 or precision.ndim != 1:
        raise ValueError(f"recall and precision must be 1-D, got shapes {recall.shape} and {precision.shape}")
    if recall.shape != precision.shape:
        raise ValueError(f"recall and precision must have the same length, got {recall.shape[0]} "
                         f"and {precision.shape[0]}")
    if not (np.all(np.isfinite(recall)) and np.all(np.isfinite(precision))):
        raise ValueError("recall and precision must not contain NaN or infinite values")
    if recall.size == 0:
        return 0.0
    if use_07_metric:
        thresholds = np.linspace(0.0, 1.0, 11)
        # reached[t, i]: detection i reaches recall threshold t; the interpolated precision at t is
        # the best precision among those (0 where the threshold is never reached). The 1e-12 slack
        # makes a recall of exactly 3/10 reach t = 0.3 (0.30000000000000004 in floating point),
        # which the devkits' float thresholds would miss; the definition says R >= t.
        reached = recall[None, :] >= thresholds[:, None] - 1e-12
        best = np.where(reached, precision[None, :], 0.0).max(axis=1)
        return float(best.mean())
    # Sentinels: recall runs from 0 to 1; precision 0 past the last detection.
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    # Precision envelope: running maximum from the right = max precision at recall >= R.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _match_image(det, gt, iou_threshold):
    """Label one image's detections TP / FP / ignored, all classes at once.

    Returns (is_tp, is_ignored) bool arrays in the detection order of ``det``. Greedy matching in
    descending score order is vectorized: each detection's candidate is its highest-IoU ground
    truth of the same class; among the detections that pick the same non-difficult ground truth
    with IoU >= threshold, only the highest-scoring one is a TP, the later ones are duplicates (FP).
    This equals the devkit's sequential loop because a detection's candidate never depends on
    which ground truths earlier detections took.
    """
    n = det["boxes"].shape[0]
    is_tp = np.zeros(n, bool)
    is_ignored = np.zeros(n, bool)
    if n == 0 or gt["boxes"].shape[0] == 0:
        return is_tp, is_ignored
    iou = pairwise_iou_numpy(det["boxes"], gt["boxes"])
    same_class = det["classes"][:, None] == gt["classes"][None, :]
    iou = np.where(same_class, iou, -1.0)
    best_gt = iou.argmax(axis=1)
    best_iou = iou[np.arange(n), best_gt]
    hit = best_iou >= iou_threshold
    is_ignored = hit & gt["difficult"][best_gt]
    candidates = hit & ~is_ignored
    # Stable sort by descending score; ties keep input order, like the devkit's stable sort.
    order = np.argsort(-det["scores"], kind="stable")
    cand_order = order[candidates[order]]
    _, first = np.unique(best_gt[cand_order], return_index=True)
    is_tp[cand_order[first]] = True
    return is_tp, is_ignored


def voc_evaluate(detections, ground_truths, iou_threshold=0.5, use_07_metric=False, class_names=None):
    """Pascal VOC mean average precision over classes.

    Args:
      detections: list with one dict per image: ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores`` [N],
        ``classes`` [N] (0-based class ids).
      ground_truths: list with one dict per image, same order: ``boxes`` [M, 4], ``classes`` [M],
        optional ``difficult`` [M] bool.
      iou_threshold: a detection matches a ground truth when IoU >= this.
      use_07_metric: 11-point AP (VOC2007) instead of all-point AP (VOC2010+).
      class_names: optional list of names; when given, classes are 0..len-1 and results are keyed
        by name, and a class id outside that range is an error. Otherwise the classes are the ids
        seen in detections or ground truths, and results are keyed by id.

    Returns:
      dict with
        ``"mAP"``: mean AP over the classes that have at least one non-difficult ground truth;
          classes without any are left out of the mean (their AP is undefined: recall has no
          denominator) and get NaN in ``"AP"``; NaN when no class has ground truth;
        ``"AP"``: {class: AP};
        ``"per_class"``: {class: {"num_gt", "num_detections", "num_tp", "num_fp", "num_ignored",
          "precision", "recall", "ap"}} with precision / recall arrays in descending-score order
          over the non-ignored detections;
        ``"iou_threshold"``, ``"metric"`` ("voc07_11point" or "voc_all_point").
    """
    iou_threshold = float(iou_threshold)
    if not 0.0 < iou_threshold <= 1.0 or not np.isfinite(iou_threshold):
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    detections = check_detections(detections)
    ground_truths = check_ground_truths(ground_truths)
    check_same_length(detections, ground_truths)

    all_scores, all_classes, all_tp, all_ignored = [], [], [], []
    for det, gt in zip(detections, ground_truths):
        is_tp, is_ignored = _match_image(det, gt, iou_threshold)
        all_scores.append(det["scores"])
        all_classes.append(det["classes"])
        all_tp.append(is_tp)
        all_ignored.append(is_ignored)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    det_classes = np.concatenate(all_classes) if all_classes else np.zeros(0, np.int64)
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
    ignored = np.concatenate(all_ignored) if all_ignored else np.zeros(0, bool)
    gt_classes = (np.concatenate([g["classes"] for g in ground_truths]) if ground_truths
                  else np.zeros(0, np.int64))
    gt_difficult = (np.concatenate([g["difficult"] for g in ground_truths]) if ground_truths
                    else np.zeros(0, bool))

    if class_names is not None:
        class_names = list(class_names)
        class_ids = np.arange(len(class_names))
        for what, ids in (("detections", det_classes), ("ground_truths", gt_classes)):
            if ids.size and ids.max() >= len(class_names):
                raise ValueError(f"{what} has class id {int(ids.max())} but class_names has only "
                                 f"{len(class_names)} names")
    else:
        class_ids = np.union1d(det_classes, gt_classes).astype(np.int64)

    ap_by_class, per_class = {}, {}
    valid_aps = []
    for c in class_ids:
        key = class_names[c] if class_names is not None else int(c)
        num_gt = int(np.count_nonzero((gt_classes == c) & ~gt_difficult))
        mine = np.flatnonzero(det_classes == c)
        mine = mine[np.argsort(-scores[mine], kind="stable")]
        num_ignored = int(np.count_nonzero(ignored[mine]))
        mine = mine[~ignored[mine]]
        tp_cum = np.cumsum(tp[mine])
        fp_cum = np.cumsum(~tp[mine])
        precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
        if num_gt > 0:
            recall = tp_cum / num_gt
            ap = voc_ap(recall, precision, use_07_metric)
            valid_aps.append(ap)
        else:
            recall = np.full(tp_cum.shape, np.nan)
            ap = float("nan")
        ap_by_class[key] = ap
        per_class[key] = {
            "num_gt": num_gt,
            "num_detections": int(mine.size + num_ignored),
            "num_tp": int(tp_cum[-1]) if tp_cum.size else 0,
            "num_fp": int(fp_cum[-1]) if fp_cum.size else 0,
            "num_ignored": num_ignored,
            "precision": precision,
            "recall": recall,
            "ap": ap,
        }
    return {
        "mAP": float(np.mean(valid_aps)) if valid_aps else float("nan"),
        "AP": ap_by_class,
        "per_class": per_class,
        "iou_threshold": iou_threshold,
        "metric": "voc07_11point" if use_07_metric else "voc_all_point",
    }
