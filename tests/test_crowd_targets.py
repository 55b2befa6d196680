"""COCO crowd regions in the training targets (issue #10): crowd boxes never make positives, are
never appended to the proposals, and anchors / RoIs mostly inside one are ignored (-1), not
background. Hand-made batches plus a loop-based numpy reference of the labelling rule."""
import numpy as np
import tensorflow as tf

from kerasdet import ops
from kerasdet.heads.cascade import relabel_rois
from kerasdet.heads.roi_sampler import sample_rois
from kerasdet.heads.rpn import rpn_targets

# One 128 x 128 image: a real object top-left, a crowd region bottom-right, far apart.
REAL = [10.0, 10.0, 42.0, 42.0]
CROWD = [70.0, 70.0, 122.0, 122.0]
GT_BOXES = np.array([[REAL, CROWD]], np.float32)
GT_LABELS = np.array([[0, 0]], np.int32)
GT_CROWD = np.array([[False, True]])
# Candidate boxes (anchors or proposals) and what the rule makes of each.
CANDIDATES = np.array([
    REAL,                      # IoU 1 with the real box: positive
    [12.0, 12.0, 40.0, 40.0],  # IoU 0.77 with the real box: positive
    CROWD,                     # the crowd box itself: ignored (was a positive)
    [72.0, 72.0, 96.0, 96.0],  # wholly inside the crowd, IoU 0.21 with it: ignored (was negative)
    [60.0, 60.0, 80.0, 80.0],  # a quarter of its area on the crowd: negative
    [0.0, 90.0, 20.0, 110.0],  # on nothing: negative
], np.float32)
RPN_EXPECTED = [1, 1, -1, -1, 0, 0]


def np_area(b):
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def np_intersection(a, b):
    return max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)


def np_iou(a, b):
    inter = np_intersection(a, b)
    union = np_area(a) + np_area(b) - inter
    return inter / union if union > 0 else 0.0


def np_crowd_labels(boxes, gt, gt_labels, gt_crowd, pos, neg, low=0.0, low_quality=False,
                    crowd_thr=0.7):
    """The rule, one box at a time: match against the non-crowd ground truth only; a box that is
    not positive and has more than `crowd_thr` of its area inside a crowd box is ignored."""
    real = [j for j in range(len(gt)) if gt_labels[j] >= 0 and not gt_crowd[j]]
    crowd = [j for j in range(len(gt)) if gt_labels[j] >= 0 and gt_crowd[j]]
    iou = np.array([[np_iou(b, gt[j]) for j in real] for b in boxes]).reshape(len(boxes), len(real))
    labels = np.full(len(boxes), -1)
    for i in range(len(boxes)):
        best = iou[i].max() if real else None
        if best is None or low <= best < neg:
            labels[i] = 0
        if best is not None and best >= pos:
            labels[i] = 1
    if low_quality:
        for k in range(len(real)):
            if iou[:, k].max() > 0:
                labels[iou[:, k] == iou[:, k].max()] = 1
    for i, b in enumerate(boxes):
        area = np_area(b)
        covered = [np_intersection(b, gt[j]) / area if area > 0 else 0.0 for j in crowd]
        if labels[i] == 0 and covered and max(covered) > crowd_thr:
            labels[i] = -1
    return labels


def test_crowd_ignore_mask_against_numpy():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (2, 40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (2, 40, 2))], -1).astype(np.float32)
    boxes[0, 0] = [5, 5, 5, 9]  # empty box: covered share 0, never ignored
    cxy = rng.uniform(0, 60, (2, 3, 2))
    crowd = np.concatenate([cxy, cxy + rng.uniform(20, 60, (2, 3, 2))], -1).astype(np.float32)
    crowd[0, 0] = [0, 0, 200, 200]  # covers everything, but not a valid crowd region
    valid = np.array([[False, True, True], [True, True, False]])
    for threshold in (0.0, 0.5, 0.7):
        got = ops.crowd_ignore_mask(boxes, crowd, valid, threshold).numpy()
        want = np.array([[any(valid[b, j] and np_area(box) > 0 and
                              np_intersection(box, crowd[b, j]) / np_area(box) > threshold
                              for j in range(3)) for box in boxes[b]] for b in range(2)])
        np.testing.assert_array_equal(got, want)
    assert not ops.crowd_ignore_mask(boxes, crowd, valid).numpy()[0, 0]


def test_match_boxes_with_crowd_against_numpy():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 90, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 50, (300, 2))], -1).astype(np.float32)
    gxy = rng.uniform(0, 70, (6, 2))
    gt = np.concatenate([gxy, gxy + rng.uniform(20, 60, (6, 2))], -1).astype(np.float32)
    gt_labels = np.array([0, 1, 2, 1, -1, 0])
    gt_crowd = np.array([False, True, False, True, True, False])  # row 4 is padding
    gt_valid, crowd_valid = ops.split_crowd(gt_labels, gt_crowd)
    np.testing.assert_array_equal(gt_valid, [True, False, True, False, False, True])
    np.testing.assert_array_equal(crowd_valid, [False, True, False, True, False, False])
    ignore = ops.crowd_ignore_mask(boxes, gt, crowd_valid)
    for pos, neg, low, lq in ((0.7, 0.3, 0.0, True), (0.5, 0.5, 0.1, False)):
        matched, labels = ops.match_boxes(ops.box_iou(boxes, gt), pos, neg, low, lq,
                                          gt_valid=gt_valid, ignore=ignore)
        want = np_crowd_labels(boxes, gt, gt_labels, gt_crowd, pos, neg, low, lq)
        np.testing.assert_array_equal(labels.numpy(), want)
        assert set(matched.numpy()[want == 1].tolist()) <= {0, 2, 5}  # never a crowd box
        # The random case exercises the rule: without the crowd part some labels would differ.
        without = np_crowd_labels(boxes, gt, gt_labels, gt_crowd, pos, neg, low, lq, crowd_thr=1.0)
        assert (want != without).sum() > 5 and (want == 1).sum() > 0


def test_rpn_targets_ignore_anchors_on_crowd_regions():
    def labels_for(gt_crowd):
        labels, _ = rpn_targets(tf.constant(CANDIDATES), tf.constant(GT_BOXES),
                                tf.constant(GT_LABELS), tf.constant([[128.0, 128.0]]),
                                num_samples=64, seed=0, gt_crowd=gt_crowd)
        return labels.numpy()[0]

    np.testing.assert_array_equal(labels_for(tf.constant(GT_CROWD)), RPN_EXPECTED)
    np.testing.assert_array_equal(
        RPN_EXPECTED, np_crowd_labels(CANDIDATES, GT_BOXES[0], GT_LABELS[0], GT_CROWD[0],
                                      0.7, 0.3, low_quality=True))
    # All-False flags are the same as none: both boxes are objects.
    np.testing.assert_array_equal(labels_for(tf.zeros([1, 2], tf.bool)), labels_for(None))
    assert labels_for(None)[2] == 1


def test_rpn_targets_never_sample_crowd_anchors_as_negatives():
    # Many anchors on the crowd and a small sample: whatever is drawn, none of them is in it.
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 100, (400, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(8, 28, (400, 2))], -1).astype(np.float32)
    on_crowd = ops.crowd_ignore_mask(anchors, GT_BOXES, GT_CROWD).numpy()[0]
    assert on_crowd.sum() > 20
    for seed in range(3):
        labels, _ = rpn_targets(tf.constant(anchors), tf.constant(GT_BOXES),
                                tf.constant(GT_LABELS), tf.constant([[128.0, 128.0]]),
                                num_samples=32, seed=seed, gt_crowd=tf.constant(GT_CROWD))
        labels = labels.numpy()[0]
        assert (labels >= 0).sum() == 32
        assert np.all(labels[on_crowd] == -1)


def _rows(boxes):
    return {tuple(np.round(b, 3)) for b in boxes}


def test_roi_sampler_ignores_crowd_and_never_adds_it_as_ground_truth():
    out = sample_rois(tf.constant(CANDIDATES[None]), tf.ones([1, len(CANDIDATES)], bool),
                      tf.constant(GT_BOXES), tf.constant(GT_LABELS), num_samples=16,
                      positive_fraction=0.5, seed=0, gt_crowd=tf.constant(GT_CROWD))
    labels, rois = out["labels"].numpy()[0], out["rois"].numpy()[0]
    used = labels >= 0
    # Foreground: the two candidates on the real box and the appended real box; background: the
    # two candidates off the crowd; the crowd box (as a proposal and as appended ground truth)
    # and the candidate inside the crowd are not sampled at all.
    assert sorted(labels[used].tolist()) == [0, 0, 1, 1, 1]
    assert _rows(rois[labels > 0]) == _rows([REAL, CANDIDATES[1]])
    assert _rows(rois[labels == 0]) == _rows(CANDIDATES[4:])
    np.testing.assert_allclose(out["matched_boxes"].numpy()[0][labels > 0], [REAL] * 3)
    # The numpy rule on the proposals plus the appended ground truth gives the same sample.
    with_gt = np.concatenate([CANDIDATES, GT_BOXES[0]])
    want = np_crowd_labels(with_gt, GT_BOXES[0], GT_LABELS[0], GT_CROWD[0], 0.5, 0.5)
    want[-1] = -1  # the appended crowd row is not a candidate
    np.testing.assert_array_equal(sorted(labels[used]), sorted(want[want >= 0]))


def test_cascade_stage_relabels_crowd_rois_as_ignored():
    out = relabel_rois(tf.constant(CANDIDATES[None]), tf.ones([1, len(CANDIDATES)], bool),
                       tf.constant(GT_BOXES), tf.constant(GT_LABELS), 0.6,
                       gt_crowd=tf.constant(GT_CROWD))
    labels = out["labels"].numpy()[0]
    # Stage labels at u = 0.6 for the six candidates, then the appended real and crowd rows.
    np.testing.assert_array_equal(labels, [1, 1, -1, -1, 0, 0, 1, -1])
    with_gt = np.concatenate([CANDIDATES, GT_BOXES[0]])
    want = np_crowd_labels(with_gt, GT_BOXES[0], GT_LABELS[0], GT_CROWD[0], 0.6, 0.6)
    want[-1] = -1
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_array_equal(out["matched_index"].numpy()[0][labels > 0], [0, 0, 0])


def _crowd_batch():
    boxes = np.array([[[4, 4, 28, 28], [32, 32, 64, 64], [0, 0, 0, 0]],
                      [[36, 6, 60, 30], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    return {"images": tf.random.uniform([2, 64, 64, 3], 0, 255, seed=3),
            "bounding_boxes": {"boxes": tf.constant(boxes),
                               "labels": tf.constant([[1, 0, -1], [2, -1, -1]]),
                               "iscrowd": tf.constant([[False, True, False],
                                                       [False, False, False]])}}


def test_faster_rcnn_threads_crowd_flags_and_trains_on_them():
    from kerasdet.models import FasterRCNN

    model = FasterRCNN(3, backbone="tiny", fpn_channels=32, fc_dim=64,
                       anchor_sizes=((16,), (32,), (64,), (128,), (256,)), rpn_batch_size=64,
                       roi_batch_size=64, rpn_pre_nms_top_k_train=200,
                       rpn_post_nms_top_k_train=100, seed=0)
    batch = _crowd_batch()
    context = model.first_stage(batch, training=True)
    sampled = model.sample_training_rois(context)
    labels, rois = sampled["labels"].numpy()[0], sampled["rois"].numpy()[0]
    crowd = [32.0, 32.0, 64.0, 64.0]
    on_crowd = [np_area(r) > 0 and np_intersection(r, crowd) / np_area(r) > 0.7 for r in rois]
    used_on_crowd = (labels >= 0) & np.array(on_crowd)
    # A RoI mostly inside the crowd cannot reach IoU 0.5 with the real box of that image, so if
    # it were used at all it would be background (or, the crowd box itself, a positive).
    assert not used_on_crowd.any(), rois[used_on_crowd]
    assert (labels > 0).sum() > 0 and np.all(sampled["matched_index"].numpy()[0][labels > 0] == 0)
    model.compile(optimizer="sgd")
    logs = model.train_on_batch(batch, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
