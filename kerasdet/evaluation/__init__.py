"""Detection metrics: Pascal VOC AP (11-point and all-point), COCO AP through pycocotools, a results
table, and a Keras callback that evaluates a detector during ``fit``.

The callback and ``evaluate_model`` import Keras; they load on first use so that evaluating saved
detections needs only numpy and pycocotools.
"""
import importlib

from kerasdet.evaluation.voc import voc_ap, voc_evaluate  # noqa: F401

_LAZY = {
    "coco_evaluate": "kerasdet.evaluation.coco",
    "coco_evaluate_json": "kerasdet.evaluation.coco",
    "coco_ground_truth": "kerasdet.evaluation.coco",
    "coco_results": "kerasdet.evaluation.coco",
    "save_coco_results": "kerasdet.evaluation.coco",
    "encode_masks": "kerasdet.evaluation.coco",
    "as_rles": "kerasdet.evaluation.coco",
    "COCO_METRIC_NAMES": "kerasdet.evaluation.coco",
    "paste_masks": "kerasdet.evaluation.masks",
    "masks_to_original_rles": "kerasdet.evaluation.masks",
    "format_metrics_table": "kerasdet.evaluation.table",
    "EvaluationCallback": "kerasdet.evaluation.callback",
    "evaluate_model": "kerasdet.evaluation.callback",
    "predictions_to_dicts": "kerasdet.evaluation.callback",
    "batch_to_ground_truths": "kerasdet.evaluation.callback",
    "metrics_to_logs": "kerasdet.evaluation.callback",
}

__all__ = ["voc_ap", "voc_evaluate", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kerasdet.evaluation' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
