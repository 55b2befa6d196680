"""COCO AP through pycocotools: perfect, hand-checkable degraded, masks, crowd, results JSON, and
agreement with the VOC all-point AP at IoU 0.5."""
import json

import numpy as np
import pytest

from kerasdet.evaluation import (coco_evaluate, coco_evaluate_json, coco_ground_truth, encode_masks,
                                 save_coco_results, voc_evaluate)


def _perfect_case():
    # Boxes of all three COCO size ranges: 20x20 (small), 50x50 (medium), 120x120 (large).
    gts = [
        {"boxes": [[10, 10, 30, 30], [40, 40, 90, 90]], "classes": [0, 1]},
        {"boxes": [[0, 0, 120, 120]], "classes": [2]},
        {"boxes": np.zeros((0, 4)), "classes": []},  # an image without objects
    ]
    dets = [
        {"boxes": [[10, 10, 30, 30], [40, 40, 90, 90]], "scores": [0.9, 0.8], "classes": [0, 1]},
        {"boxes": [[0, 0, 120, 120]], "scores": [0.7], "classes": [2]},
        {"boxes": np.zeros((0, 4)), "scores": [], "classes": []},
    ]
    return dets, gts


def test_perfect_detections_give_ap_one():
    dets, gts = _perfect_case()
    m = coco_evaluate(dets, gts, class_names=["a", "b", "c"])["bbox"]
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert m[name] == pytest.approx(1.0), name
    assert m["per_class_AP"] == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})


def test_degraded_case_by_hand():
    # Class 0 has two gts (both large, 100x100) in one image; detections: exact copy of gt A
    # (score .9), a far-away FP (.8); gt B is missed. At every IoU threshold: precision 1, 1/2 at
    # recall 1/2, 1/2. COCO samples the envelope at the 101 recall points 0, .01, ..., 1: precision
    # 1 at the 51 points r <= .5 and 0 above -> AP = AP50 = AP75 = 51/101; AR100 = 1/2.
    gts = [{"boxes": [[0, 0, 100, 100], [200, 0, 300, 100]], "classes": [0, 0]}]
    dets = [{"boxes": [[0, 0, 100, 100], [500, 500, 600, 600]], "scores": [0.9, 0.8], "classes": [0, 0]}]
    m = coco_evaluate(dets, gts)["bbox"]
    assert m["AP"] == pytest.approx(51 / 101)
    assert m["AP50"] == pytest.approx(51 / 101) and m["AP75"] == pytest.approx(51 / 101)
    assert m["AR100"] == pytest.approx(0.5)
    assert np.isnan(m["APs"]) and np.isnan(m["APm"])  # no small / medium gt: pycocotools' -1


def test_iou_dependent_case_by_hand():
    # One gt [0,0,100,100], one detection [0,0,100,62]: IoU = 6200/10000 = 0.62. It matches at the
    # IoU thresholds .50 .55 .60 (AP 1 each) and not at .65 ... .95 (AP 0): AP = 3/10, AP50 = 1,
    # AP75 = 0. The gt is large (area 10000 > 96^2), so APl = AP.
    gts = [{"boxes": [[0, 0, 100, 100]], "classes": [0]}]
    dets = [{"boxes": [[0, 0, 100, 62]], "scores": [0.5], "classes": [0]}]
    m = coco_evaluate(dets, gts)["bbox"]
    assert m["AP"] == pytest.approx(0.3)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == 0.0
    assert m["APl"] == pytest.approx(0.3)


def test_no_detections_at_all_is_zero_not_a_crash():
    _, gts = _perfect_case()
    empty = [{"boxes": np.zeros((0, 4)), "scores": [], "classes": []}] * 3
    m = coco_evaluate(empty, gts)["bbox"]
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0


def test_crowd_region_absorbs_detections():
    # gt 0 normal, gt 1 crowd. A detection inside the crowd region is neither TP nor FP, so with the
    # normal gt found the AP is 1. Without the crowd flag the second gt is a missed positive.
    gts = [{"boxes": [[0, 0, 50, 50], [100, 0, 200, 100]], "classes": [0, 0], "iscrowd": [0, 1]}]
    dets = [{"boxes": [[110, 10, 150, 50], [0, 0, 50, 50]], "scores": [0.9, 0.8], "classes": [0, 0]}]
    assert coco_evaluate(dets, gts)["bbox"]["AP"] == pytest.approx(1.0)
    gts[0]["iscrowd"] = [0, 0]
    assert coco_evaluate(dets, gts)["bbox"]["AP"] < 0.6


def _masks_case():
    h, w = 64, 80
    gt_masks = np.zeros((2, h, w), np.uint8)
    gt_masks[0, 5:25, 5:45] = 1
    gt_masks[1, 30:60, 40:70] = 1
    gt_masks[1, 30:40, 40:50] = 0  # not a rectangle: box AP and mask AP are different things
    gts = [{"boxes": [[5, 5, 45, 25], [40, 30, 70, 60]], "classes": [0, 1], "masks": gt_masks}]
    return gts, gt_masks


def test_mask_ap_with_perfect_masks():
    gts, gt_masks = _masks_case()
    probs = gt_masks.astype(np.float32) * 0.9 + 0.05  # probabilities; thresholded at 0.5
    dets = [{"boxes": gts[0]["boxes"], "scores": [0.9, 0.8], "classes": [0, 1], "masks": probs}]
    m = coco_evaluate(dets, gts, iou_types=("bbox", "segm"))
    assert m["segm"]["AP"] == pytest.approx(1.0)
    assert m["bbox"]["AP"] == pytest.approx(1.0)


def test_mask_ap_degraded_by_hand():
    # The class-0 mask covers rows 5..24 (20 rows x 40 cols = 800 px); the detection's mask covers
    # rows 5..15 (11 rows = 440 px): mask IoU = 440 / 800 = 0.55 -> matched at .50 and .55 only:
    # AP = 2/10 for class 0; class 1 perfect (AP 1); mean over the two classes = 0.6.
    gts, gt_masks = _masks_case()
    masks = gt_masks.copy()
    masks[0, 16:25] = 0
    dets = [{"boxes": gts[0]["boxes"], "scores": [0.9, 0.8], "classes": [0, 1], "masks": masks}]
    m = coco_evaluate(dets, gts, iou_types="segm")["segm"]
    assert m["per_class_AP"][0] == pytest.approx(0.2)
    assert m["AP"] == pytest.approx(0.6)


def test_rle_masks_give_the_same_result_as_dense_masks():
    # The evaluation callback keeps masks as RLE to save memory; both forms must score alike.
    gts, gt_masks = _masks_case()
    masks = gt_masks.copy()
    masks[0, 16:25] = 0
    dense = [{"boxes": gts[0]["boxes"], "scores": [0.9, 0.8], "classes": [0, 1], "masks": masks}]
    rle = [dict(dense[0], masks=encode_masks(masks))]
    rle_gts = [dict(gts[0], masks=encode_masks(gt_masks))]
    expected = coco_evaluate(dense, gts, iou_types="segm")["segm"]["AP"]
    assert coco_evaluate(rle, rle_gts, iou_types="segm")["segm"]["AP"] == pytest.approx(expected)
    assert expected == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"detections\[0\]\['masks'\] has 1 RLE entries"):
        coco_evaluate([dict(dense[0], masks=rle[0]["masks"][:1])], gts, iou_types="segm")


def test_results_json_and_annotation_json_paths(tmp_path):
    gts, gt_masks = _masks_case()
    masks = gt_masks.copy()
    masks[0, 16:25] = 0
    dets = [{"boxes": [[5, 5, 45, 20], [40, 30, 70, 60]], "scores": [0.9, 0.8], "classes": [0, 1],
             "masks": masks}]
    direct = coco_evaluate(dets, gts, iou_types=("bbox", "segm"))
    coco, category_ids = coco_ground_truth(gts)
    results_path = tmp_path / "out" / "results.json"
    assert save_coco_results(dets, results_path, category_ids=category_ids, iou_types=("bbox", "segm")) == 2
    from_file = coco_evaluate_json(results_path, coco, iou_types=("bbox", "segm"))
    for t in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert from_file[t][name] == pytest.approx(direct[t][name]), (t, name)
    # Ground truth from an annotation JSON on disk, with its own (non-contiguous) category ids.
    data = coco.dataset
    for cat in data["categories"]:
        cat["id"] *= 7
    for ann in data["annotations"]:
        ann["category_id"] *= 7
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps(data))
    from_ann = coco_evaluate(dets, coco_gt=ann_path, iou_types=("bbox", "segm"), image_ids=[1])
    for t in ("bbox", "segm"):
        assert from_ann[t]["AP"] == pytest.approx(direct[t]["AP"])


def test_empty_results_file(tmp_path):
    _, gts = _perfect_case()
    coco, _ = coco_ground_truth(gts)
    path = tmp_path / "empty.json"
    path.write_text("[]")
    assert coco_evaluate_json(path, coco)["bbox"]["AP"] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_ap50_agrees_with_voc_all_point(seed):
    # Well-separated gts (one per 60-px cell), so a detection overlaps at most one gt and the VOC and
    # COCO matching rules (VOC: best gt, taken -> FP; COCO: best untaken gt) give the same TP/FP list.
    # With no difficult or crowd objects and <= 100 detections per image, the only difference left is
    # the integration: VOC integrates the precision envelope exactly, COCO averages it at 101 recall
    # points. Sampling a step function at spacing .01 moves each step edge by < .01, so the two differ
    # by at most about .01 per precision drop; on these cases they agree to 0.02.
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(8):
        cells = rng.permutation(16)[: rng.integers(1, 6)]
        xy = np.stack([cells % 4, cells // 4], 1) * 60.0 + 5
        wh = rng.uniform(15, 40, xy.shape)
        boxes = np.concatenate([xy, xy + wh], 1)
        classes = rng.integers(0, 2, len(cells))
        gts.append({"boxes": boxes, "classes": classes})
        keep = rng.random(len(cells)) < 0.8
        found = boxes[keep] + rng.normal(0, 3, (keep.sum(), 4))
        found[:, 2:] = np.maximum(found[:, 2:], found[:, :2] + 2)
        dup = found[:1]
        junk_xy = rng.uniform(0, 200, (2, 2))
        junk = np.concatenate([junk_xy, junk_xy + 20], 1)
        det_boxes = np.concatenate([found, dup, junk])
        det_classes = np.concatenate([classes[keep], classes[keep][:1], rng.integers(0, 2, 2)])
        dets.append({"boxes": det_boxes, "scores": rng.random(len(det_boxes)), "classes": det_classes})
    voc = voc_evaluate(dets, gts, iou_threshold=0.5)["mAP"]
    coco = coco_evaluate(dets, gts)["bbox"]["AP50"]
    assert coco == pytest.approx(voc, abs=0.02)


def test_verbose_prints_only_when_asked(capsys):
    dets, gts = _perfect_case()
    coco_evaluate(dets, gts)
    assert capsys.readouterr().out == ""
    coco_evaluate(dets, gts, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_errors():
    dets, gts = _perfect_case()
    with pytest.raises(ValueError, match="exactly one of ground_truths"):
        coco_evaluate(dets)
    with pytest.raises(ValueError, match=r"detections\[0\] has no 'masks'"):
        coco_evaluate(dets, gts, iou_types="segm")
    with pytest.raises(ValueError, match="'bbox' or 'segm'"):
        coco_evaluate(dets, gts, iou_types="keypoints")
    with pytest.raises(ValueError, match="outside class_names"):
        coco_evaluate(dets, gts, class_names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="results file not found"):
        coco_evaluate_json("no/such/file.json", coco_ground_truth(gts)[0])
    coco, _ = coco_ground_truth(gts)
    bad = [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(ValueError, match=r"image ids not in the ground truth: \[99\]"):
        coco_evaluate_json(bad, coco)
    masks_gts, _ = _masks_case()
    wrong = [{"boxes": [[0, 0, 1, 1]], "scores": [1.0], "classes": [0], "masks": np.ones((1, 5, 5))}]
    with pytest.raises(ValueError, match="masks must be image-sized"):
        coco_evaluate(wrong, masks_gts, iou_types="segm")


def test_string_image_ids_and_restriction_to_the_evaluated_images(tmp_path):
    # VOC records are named by file stems: they serve as COCO image ids as they are.
    dets, gts = _perfect_case()
    by_int = coco_evaluate(dets, gts)["bbox"]
    by_stem = coco_evaluate(dets, gts, image_ids=["000005", "000007", "000009"])["bbox"]
    names = ("AP", "APs", "APm", "APl", "AR100")
    assert [by_stem[n] for n in names] == [by_int[n] for n in names]
    with pytest.raises(TypeError, match="all ints or all strs"):
        coco_evaluate(dets, gts, image_ids=[1, "2", 3])
    # Against an annotation file, only the images given are scored: the objects of the others are
    # not missed detections (here: perfect detections of image 1 alone give AP 1).
    coco, _ = coco_ground_truth(gts)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco.dataset))
    alone = coco_evaluate(dets[:1], coco_gt=path, image_ids=[1])["bbox"]
    assert alone["AP"] == pytest.approx(1.0) and np.isnan(alone["APl"])
    with pytest.raises(ValueError, match=r"image ids not in the ground truth: \[42\]"):
        coco_evaluate(dets[:1], coco_gt=path, image_ids=[42])
