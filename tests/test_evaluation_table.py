"""The results table: per-class rows, means, undefined values and the accepted input shapes."""
import numpy as np
import pytest

from kerasdet.evaluation import coco_evaluate, format_metrics_table, voc_evaluate

GTS = [{"boxes": [[0, 0, 10, 10], [20, 0, 30, 10]], "classes": [0, 0]},
       {"boxes": [[0, 0, 40, 40]], "classes": [1]}]
DETS = [{"boxes": [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 5, 5]], "scores": [0.9, 0.8, 0.7],
         "classes": [0, 0, 2]},
        {"boxes": [[0, 0, 40, 40]], "scores": [0.5], "classes": [1]}]


def _rows(table):
    return {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}


def test_voc_and_coco_table_with_names():
    voc = voc_evaluate(DETS, GTS)
    coco = coco_evaluate(DETS, GTS)
    table = format_metrics_table({"voc": voc, "coco": coco}, class_names=["cat", "dog", "bird"])
    rows = _rows(table)
    # cat: 2 gts, 2 detections, VOC AP = 1/2 (TP then FP, recall 1/2) -> "50.0"
    assert rows["cat"][1:4] == ["2", "2", f"{100 * voc['AP'][0]:.1f}"] and rows["cat"][3] == "50.0"
    assert rows["cat"][4] == f"{100 * coco['bbox']['per_class_AP'][0]:.1f}"
    # bird has detections but no gt: AP undefined -> "-"
    assert rows["bird"][3] == "-" and rows["bird"][4] == "-"
    assert rows["mean"][1:] == [f"{100 * voc['mAP']:.1f}", f"{100 * coco['bbox']['AP']:.1f}"]
    assert "VOC (all-point, IoU 0.5)" in table and "COCO bbox: AP " in table
    assert table.splitlines()[0].split() == ["class", "#gt", "#det", "VOC", "AP50", "box", "AP"]


def test_single_sources_and_ids_without_names():
    voc07 = voc_evaluate(DETS, GTS, use_07_metric=True, iou_threshold=0.7)
    table = format_metrics_table(voc07)
    assert "VOC (11-point, IoU 0.7)" in table and "AP70" in table
    assert set(_rows(table)) >= {"0", "1", "2", "mean"}
    coco_only = format_metrics_table(coco_evaluate(DETS, GTS))
    assert "VOC" not in coco_only and "COCO bbox" in coco_only


def test_rejects_unknown_shapes():
    with pytest.raises(ValueError, match="neither VOC results"):
        format_metrics_table({"accuracy": 1.0})
    with pytest.raises(TypeError, match="must be a dict"):
        format_metrics_table([np.nan])
