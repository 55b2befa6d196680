"""Pascal VOC AP: hand-worked examples and a plain-loop reference written from the devkit's definition."""
import numpy as np
import pytest

from kerasdet.evaluation import voc_ap, voc_evaluate
from kerasdet.numpy_boxes import pairwise_iou_numpy


def _box(i, size=10.0):
    """A box in its own slot of a row, so boxes with different i never overlap."""
    x = 20.0 * i
    return [x, 0.0, x + size, size]


FAR = [1000.0, 1000.0, 1010.0, 1010.0]  # overlaps nothing: a false positive


# ---------------------------------------------------------------- voc_ap on hand-made curves

def test_voc_ap_hand_example_three_gts_five_detections():
    # 3 ground truths; detections in score order are TP, FP, TP, FP, FP.
    # cumulative TP: 1 1 2 2 2  -> recall    1/3 1/3 2/3 2/3 2/3
    # cumulative FP: 0 1 1 2 3  -> precision 1   1/2 2/3 1/2 2/5
    # all-point: envelope at recall 1/3 is 1, at 2/3 is max(2/3, 1/2, 2/5) = 2/3, past 2/3 it is 0:
    #   AP = (1/3 - 0) * 1 + (2/3 - 1/3) * 2/3 = 1/3 + 2/9 = 5/9
    # 11-point: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7 .. 1 -> 0 (never reached):
    #   AP = (4 * 1 + 3 * 2/3) / 11 = 6/11
    recall = np.array([1, 1, 2, 2, 2]) / 3
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2, 2 / 5])
    assert voc_ap(recall, precision) == pytest.approx(5 / 9)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(6 / 11)


def test_voc_ap_survey_example():
    # Padilla et al.'s survey (seed 004): 15 ground truths, 24 detections R Y J A U C M F D B H P E X
    # N T K Q V I L S G O of which R J B P E X G are true positives.
    # Recall rises at detections 1, 3, 10, 12, 13, 14, 23 with precision 1, 2/3, 3/10, 4/12, 5/13,
    # 6/14, 7/23. Envelope: 1 on (0, 1/15], 2/3 on (1/15, 2/15], 6/14 on (2/15, 6/15], 7/23 on
    # (6/15, 7/15]:  AP_all = (1 + 2/3 + 4 * 6/14 + 7/23) / 15 = 0.2456...  (survey: 24.56 %)
    # 11-point: t=0 -> 1, t=.1 -> 2/3, t=.2 .3 .4 -> 6/14, t >= .5 -> 0:
    #   AP_11 = (1 + 2/3 + 3 * 6/14) / 11 = 0.2684...  (survey: 26.84 %)
    tp = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(1 - tp)
    recall, precision = tp_cum / 15, tp_cum / (tp_cum + fp_cum)
    expected_all = (1 + 2 / 3 + 4 * 6 / 14 + 7 / 23) / 15
    expected_11 = (1 + 2 / 3 + 3 * 6 / 14) / 11
    assert voc_ap(recall, precision) == pytest.approx(expected_all)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(expected_11)
    # The survey rounds its precisions to 4 digits, hence the loose comparison with its numbers.
    assert voc_ap(recall, precision) == pytest.approx(0.2456, abs=2e-4)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(0.2684, abs=2e-4)


def test_voc_ap_empty_and_perfect():
    assert voc_ap([], []) == 0.0
    assert voc_ap([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)
    assert voc_ap([0.5, 1.0], [1.0, 1.0], use_07_metric=True) == pytest.approx(1.0)


def test_eleven_point_thresholds_are_reached_exactly():
    # 10 gts, 3 TPs: recall .1 .2 .3 with precision 1. R >= t holds for t = 0, .1, .2, .3 -> AP = 4/11
    # (a float threshold of 0.30000000000000004 compared strictly would give 3/11).
    recall = np.array([1, 2, 3]) / 10
    assert voc_ap(recall, np.ones(3), use_07_metric=True) == pytest.approx(4 / 11)


def test_pairwise_iou_against_scalar_definition():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 20, (6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 10, (6, 2))], 1)
    boxes[0, 2] = boxes[0, 0]  # zero-area box: IoU 0 with everything, including itself
    iou = pairwise_iou_numpy(boxes, boxes[::-1])
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes[::-1]):
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
            assert iou[i, j] == pytest.approx(iw * ih / union if union > 0 else 0.0)
    assert pairwise_iou_numpy(np.zeros((0, 4)), boxes).shape == (0, 6)


@pytest.mark.parametrize("recall, precision, message", [
    ([0.1, 0.2], [1.0], "same length"),
    ([[0.1]], [[1.0]], "1-D"),
    ([0.1, np.nan], [1.0, 1.0], "NaN"),
])
def test_voc_ap_rejects_bad_input(recall, precision, message):
    with pytest.raises(ValueError, match=message):
        voc_ap(recall, precision)


# ---------------------------------------------------------------- voc_evaluate

def test_voc_evaluate_hand_example_matches_the_curve():
    # Same TP/FP order as the first hand example, built from boxes over two images:
    # image 0: gts g0, g1; image 1: gt g2. Scores .9 TP(g0), .8 FP(far), .7 TP(g2), .6 FP (far),
    # .5 FP (duplicate on g0) -> AP_all = 5/9, AP_11 = 6/11.
    gts = [{"boxes": [_box(0), _box(1)], "classes": [0, 0]},
           {"boxes": [_box(0)], "classes": [0]}]
    dets = [{"boxes": [_box(0), FAR, [0.5, 0.5, 10.5, 10.5]], "scores": [0.9, 0.8, 0.5],
             "classes": [0, 0, 0]},
            {"boxes": [_box(0), FAR], "scores": [0.7, 0.6], "classes": [0, 0]}]
    result = voc_evaluate(dets, gts)
    assert result["mAP"] == pytest.approx(5 / 9)
    assert result["AP"][0] == pytest.approx(5 / 9)
    info = result["per_class"][0]
    assert (info["num_gt"], info["num_tp"], info["num_fp"]) == (3, 2, 3)
    np.testing.assert_allclose(info["recall"], np.array([1, 1, 2, 2, 2]) / 3)
    np.testing.assert_allclose(info["precision"], [1, 1 / 2, 2 / 3, 1 / 2, 2 / 5])
    assert voc_evaluate(dets, gts, use_07_metric=True)["mAP"] == pytest.approx(6 / 11)


def test_duplicate_of_a_taken_gt_is_false_positive_even_if_another_gt_overlaps():
    # Two gts overlap each other; both detections have their best IoU with gt A. The second one is a
    # duplicate (FP) although its IoU with gt B is >= 0.5 too: VOC looks at the best gt only.
    # TP, FP with 2 gts -> recall 1/2, 1/2; precision 1, 1/2 -> AP_all = 1/2 * 1 = 1/2.
    gt_a, gt_b = [0, 0, 10, 10], [1, 0, 11, 10]
    gts = [{"boxes": [gt_a, gt_b], "classes": [0, 0]}]
    dets = [{"boxes": [[0, 0, 10, 10], [0.2, 0, 10.2, 10]], "scores": [0.9, 0.8], "classes": [0, 0]}]
    result = voc_evaluate(dets, gts)
    assert result["per_class"][0]["num_fp"] == 1
    assert result["mAP"] == pytest.approx(0.5)


def test_difficult_neither_counts_nor_penalizes():
    # gt 0 normal, gt 1 difficult. Detections: .9 on the difficult gt (ignored), .8 on gt 0 (TP),
    # .7 duplicate on the difficult gt (ignored too). One positive, one TP first -> AP = 1.
    gts = [{"boxes": [_box(0), _box(1)], "classes": [3, 3], "difficult": [False, True]}]
    dets = [{"boxes": [_box(1), _box(0), _box(1)], "scores": [0.9, 0.8, 0.7], "classes": [3, 3, 3]}]
    result = voc_evaluate(dets, gts)
    assert result["mAP"] == pytest.approx(1.0)
    info = result["per_class"][3]
    assert (info["num_gt"], info["num_tp"], info["num_fp"], info["num_ignored"]) == (1, 1, 0, 2)
    # Without the flag, the same detections give TP, TP, FP over 2 gts -> AP = 1.
    # A missed difficult gt costs nothing, a missed normal one halves the recall:
    dets_missing = [{"boxes": [_box(0)], "scores": [0.8], "classes": [3]}]
    assert voc_evaluate(dets_missing, gts)["mAP"] == pytest.approx(1.0)
    gts_plain = [{"boxes": [_box(0), _box(1)], "classes": [3, 3]}]
    assert voc_evaluate(dets_missing, gts_plain)["mAP"] == pytest.approx(0.5)


def test_multi_class_mean_and_class_without_ground_truth():
    # class 0: one gt, found -> AP 1. class 1: two gts, one found by the second detection after an
    # FP -> recall 0, 1/2; precision 0, 1/2 -> AP_all = 1/2 * 1/2 = 1/4.
    # class 2: detections but no gt -> AP undefined (NaN), left out of the mean.
    # mAP = (1 + 1/4) / 2 = 5/8.
    gts = [{"boxes": [_box(0), _box(1), _box(2)], "classes": [0, 1, 1]}]
    dets = [{"boxes": [_box(0), FAR, _box(1), _box(3)], "scores": [0.5, 0.9, 0.8, 0.95],
             "classes": [0, 1, 1, 2]}]
    names = ["cat", "dog", "bird", "fish"]
    result = voc_evaluate(dets, gts, class_names=names)
    assert result["AP"]["cat"] == pytest.approx(1.0)
    assert result["AP"]["dog"] == pytest.approx(0.25)
    assert np.isnan(result["AP"]["bird"]) and np.isnan(result["AP"]["fish"])
    assert result["mAP"] == pytest.approx(5 / 8)
    # Without names the classes are the ids seen; class 3 is not seen at all.
    assert set(voc_evaluate(dets, gts)["AP"]) == {0, 1, 2}


def test_detection_of_the_wrong_class_is_false_positive():
    gts = [{"boxes": [_box(0)], "classes": [0]}]
    dets = [{"boxes": [_box(0), _box(0)], "scores": [0.9, 0.8], "classes": [1, 0]}]
    result = voc_evaluate(dets, gts)
    assert result["AP"][0] == pytest.approx(1.0)
    assert result["per_class"][1]["num_fp"] == 1


def test_empty_detections_and_empty_images():
    gts = [{"boxes": [_box(0)], "classes": [0]}, {"boxes": np.zeros((0, 4)), "classes": []}]
    dets = [{"boxes": np.zeros((0, 4)), "scores": [], "classes": []}] * 2
    result = voc_evaluate(dets, gts)
    assert result["mAP"] == 0.0
    assert result["per_class"][0]["num_tp"] == 0
    nothing = voc_evaluate(dets, [gts[1], gts[1]])
    assert np.isnan(nothing["mAP"]) and nothing["AP"] == {}


def test_iou_threshold_is_inclusive_and_continuous_coordinates():
    # gt [0,0,10,10] (area 100, no +1). Detection [0,0,10,5]: IoU = 50 / 100 = 0.5 exactly -> TP at
    # 0.5, FP at 0.51. With the +1 convention it would be 66/121 = 0.545 and match at 0.51 too.
    gts = [{"boxes": [[0, 0, 10, 10]], "classes": [0]}]
    dets = [{"boxes": [[0, 0, 10, 5]], "scores": [1.0], "classes": [0]}]
    assert voc_evaluate(dets, gts, iou_threshold=0.5)["mAP"] == pytest.approx(1.0)
    assert voc_evaluate(dets, gts, iou_threshold=0.51)["mAP"] == 0.0


# ---------------------------------------------------------------- reference loop on random data

def _reference_voc(dets, gts, cls, thr, use_07):
    """Sequential devkit-style evaluation of one class, written from the definition."""
    records = []
    for i, d in enumerate(dets):
        for b, s, c in zip(d["boxes"], d["scores"], d["classes"]):
            if c == cls:
                records.append((-s, i, list(b)))
    records.sort(key=lambda r: r[0])  # stable: ties keep image order then input order
    taken = {i: [False] * len(g["boxes"]) for i, g in enumerate(gts)}
    npos = sum(1 for g in gts for c, dif in zip(g["classes"], g["difficult"]) if c == cls and not dif)
    tp, fp = [], []
    for _, i, b in records:
        best, jbest = -1.0, -1
        for j, (gb, gc) in enumerate(zip(gts[i]["boxes"], gts[i]["classes"])):
            if gc != cls:
                continue
            iw = max(0.0, min(b[2], gb[2]) - max(b[0], gb[0]))
            ih = max(0.0, min(b[3], gb[3]) - max(b[1], gb[1]))
            inter = iw * ih
            union = (b[2] - b[0]) * (b[3] - b[1]) + (gb[2] - gb[0]) * (gb[3] - gb[1]) - inter
            iou = inter / union if union > 0 else 0.0
            if iou > best:
                best, jbest = iou, j
        if best >= thr:
            if gts[i]["difficult"][jbest]:
                continue
            if not taken[i][jbest]:
                taken[i][jbest] = True
                tp.append(1)
                fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        else:
            tp.append(0)
            fp.append(1)
    if npos == 0:
        return None
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    rec = tp_c / npos
    prec = tp_c / np.maximum(tp_c + fp_c, 1)
    if use_07:
        return np.mean([max([p for r, p in zip(rec, prec) if r >= t] or [0.0])
                        for t in np.linspace(0, 1, 11)])
    # all-point: sum over recall steps of (delta recall) * max precision at recall >= this step
    ap, prev = 0.0, 0.0
    for k in range(len(rec)):
        if rec[k] > prev:
            ap += (rec[k] - prev) * max(prec[k:])
            prev = rec[k]
    return ap


def _random_case(rng, num_images=12, num_classes=3):
    gts, dets = [], []
    for _ in range(num_images):
        m = rng.integers(0, 5)
        xy = rng.uniform(0, 40, (m, 2))
        wh = rng.uniform(5, 20, (m, 2))
        gboxes = np.concatenate([xy, xy + wh], 1)
        gts.append({"boxes": gboxes, "classes": rng.integers(0, num_classes, m),
                    "difficult": rng.random(m) < 0.2})
        n = rng.integers(0, 8)
        # detections: jittered copies of gts (some duplicates) plus random boxes
        src = gboxes[rng.integers(0, m, n)] if m else np.zeros((0, 4))
        jitter = src + rng.normal(0, 2.0, src.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        xy = rng.uniform(0, 40, (3, 2))
        rand = np.concatenate([xy, xy + rng.uniform(5, 20, (3, 2))], 1)
        boxes = np.concatenate([jitter, rand])
        k = boxes.shape[0]
        # quantized scores make ties, which exercise the ordering rule
        dets.append({"boxes": boxes, "scores": np.round(rng.random(k), 1),
                     "classes": rng.integers(0, num_classes, k)})
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("use_07", [False, True])
def test_matches_sequential_reference_on_random_cases(seed, use_07):
    rng = np.random.default_rng(seed)
    dets, gts = _random_case(rng)
    thr = [0.5, 0.3, 0.7][seed % 3]
    result = voc_evaluate(dets, gts, iou_threshold=thr, use_07_metric=use_07)
    expected = []
    for cls in range(3):
        ref = _reference_voc(dets, gts, cls, thr, use_07)
        if ref is None:
            assert cls not in result["AP"] or np.isnan(result["AP"][cls])
        else:
            assert result["AP"][cls] == pytest.approx(ref, abs=1e-12), cls
            expected.append(ref)
    assert result["mAP"] == pytest.approx(np.mean(expected))


# ---------------------------------------------------------------- bad input

GOOD_GT = {"boxes": [[0, 0, 1, 1]], "classes": [0]}
GOOD_DET = {"boxes": [[0, 0, 1, 1]], "scores": [0.5], "classes": [0]}


@pytest.mark.parametrize("dets, gts, error, message", [
    ([GOOD_DET], [GOOD_GT, GOOD_GT], ValueError, "1 images but ground_truths has 2"),
    ([GOOD_DET, {"boxes": [[0, 0, 1]], "scores": [1], "classes": [0]}], [GOOD_GT] * 2, ValueError,
     r"detections\[1\]\['boxes'\] must have shape \[N, 4\]"),
    ([{"boxes": [[0, 0, 1, 1]], "scores": [np.nan], "classes": [0]}], [GOOD_GT], ValueError,
     r"detections\[0\]\['scores'\] contains NaN"),
    ([GOOD_DET], [{"boxes": [[0, 0, np.nan, 1]], "classes": [0]}], ValueError,
     r"ground_truths\[0\]\['boxes'\] contains NaN"),
    ([{"boxes": [[0, 0, 1, 1]], "classes": [0]}], [GOOD_GT], KeyError, r"detections\[0\] has no 'scores'"),
    ([{"boxes": [[0, 0, 1, 1]], "scores": [0.5, 0.4], "classes": [0]}], [GOOD_GT], ValueError,
     r"detections\[0\]\['scores'\] must have shape \[1\]"),
    ([GOOD_DET], [{"boxes": [[0, 0, 1, 1]], "classes": [-1]}], ValueError, "padding"),
    ([GOOD_DET], [{"boxes": [[5, 0, 1, 1]], "classes": [0]}], ValueError, "x2 < x1"),
    ([GOOD_DET], [{"boxes": [[0, 0, 1, 1]], "classes": [0.5]}], ValueError, "integers"),
    ({"boxes": []}, [GOOD_GT], TypeError, "one dict per image"),
])
def test_bad_input_names_image_and_key(dets, gts, error, message):
    with pytest.raises(error, match=message):
        voc_evaluate(dets, gts)


def test_class_id_beyond_class_names_is_an_error():
    with pytest.raises(ValueError, match="class id 1 but class_names has only 1"):
        voc_evaluate([{"boxes": [[0, 0, 1, 1]], "scores": [1], "classes": [1]}], [GOOD_GT],
                     class_names=["only"])


def test_accepts_tensors():
    import tensorflow as tf

    dets = [{k: tf.constant(v) for k, v in GOOD_DET.items()}]
    gts = [{k: tf.constant(v) for k, v in GOOD_GT.items()}]
    assert voc_evaluate(dets, gts)["mAP"] == pytest.approx(1.0)
