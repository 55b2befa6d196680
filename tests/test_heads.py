"""The shared two-stage parts against numpy references written from the papers' definitions."""
import math

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.heads.box_outputs import box_head_losses, decode_detections
from kerasdet.heads.roi_extractor import RoIExtractor, fpn_level_of_rois
from kerasdet.heads.roi_sampler import sample_rois
from kerasdet.heads.rpn import RPNHead, generate_proposals, rpn_targets


def np_iou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def random_boxes(rng, n, size=200.0):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(4, size * 0.5, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, size)], 1).astype(np.float32)


def test_fpn_level_assignment_matches_equation_1():
    sides = np.array([10, 111, 112, 223, 224, 447, 448, 895, 896, 2000], np.float32)
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], 1)
    expected = np.clip(np.floor(4 + np.log2(sides / 224.0)), 2, 5).astype(np.int32)
    np.testing.assert_array_equal(fpn_level_of_rois(tf.constant(boxes)).numpy(), expected)
    # The boundaries of the equation: 224 -> level 4, 112 -> 3, 448 -> 5.
    assert list(expected[[2, 4, 6]]) == [3, 4, 5]


def test_roi_sampler_counts_fractions_and_labels():
    rng = np.random.default_rng(0)
    gt = random_boxes(rng, 5)
    labels = np.array([0, 2, 1, 1, 2], np.int32)
    proposals = np.concatenate([random_boxes(rng, 300), gt + rng.normal(0, 3, gt.shape)], 0)
    gt_b = np.concatenate([gt, np.zeros((2, 4), np.float32)])[None]  # two padding rows
    lab_b = np.concatenate([labels, [-1, -1]])[None]
    out = sample_rois(tf.constant(proposals[None], tf.float32), tf.ones([1, len(proposals)], bool),
                      tf.constant(gt_b), tf.constant(lab_b), num_samples=64,
                      positive_fraction=0.25, seed=3)
    roi_labels = out["labels"].numpy()[0]
    rois = out["rois"].numpy()[0]
    assert roi_labels.shape == (64,)
    fg = roi_labels > 0
    assert 0 < fg.sum() <= 16  # at most 25 % foreground
    assert (roi_labels >= 0).sum() == 64  # enough background to fill the rest
    # Each sampled RoI's label follows from its IoU with the ground truth (numpy reference).
    iou = np_iou(rois, gt)
    best, arg = iou.max(1), iou.argmax(1)
    np.testing.assert_array_equal(fg, best >= 0.5)
    np.testing.assert_array_equal(roi_labels[fg], labels[arg[fg]] + 1)
    np.testing.assert_allclose(out["matched_boxes"].numpy()[0][fg], gt[arg[fg]])
    # Ground truth is added to the candidates: all 5 are foreground candidates, so with 16 slots
    # and few good proposals every gt box can be drawn; at least the sample is not empty.
    assert len({tuple(r) for r in rois[fg]}) == fg.sum()


def test_roi_sampler_fast_rcnn_background_band_and_empty_image():
    gt = np.array([[[10, 10, 50, 50]]], np.float32)
    proposals = np.array([[[10, 10, 50, 50], [30, 10, 70, 50], [100, 100, 120, 120],
                           [12, 12, 50, 50]]], np.float32)
    # IoUs: 1.0, 1/3 (bg), 0 (below 0.1: ignored in Fast R-CNN), 0.9025 (fg).
    out = sample_rois(tf.constant(proposals), tf.ones([1, 4], bool), tf.constant(gt),
                      tf.constant([[0]]), num_samples=8, background_iou_low=0.1,
                      add_ground_truth=False, seed=1)
    labels = out["labels"].numpy()[0]
    assert sorted(labels[labels >= 0].tolist()) == [0, 1, 1]
    assert (labels == -1).sum() == 5
    # No ground truth at all: every valid proposal is background.
    out = sample_rois(tf.constant(proposals), tf.ones([1, 4], bool), tf.zeros([1, 1, 4]),
                      tf.constant([[-1]]), num_samples=8, seed=1)
    labels = out["labels"].numpy()[0]
    assert (labels == 0).sum() == 4 and (labels > 0).sum() == 0


def test_rpn_targets_follow_the_faster_rcnn_rules():
    rng = np.random.default_rng(1)
    anchors = random_boxes(rng, 600)
    gt = random_boxes(rng, 3)
    labels, targets = rpn_targets(tf.constant(anchors), tf.constant(gt[None]),
                                  tf.constant([[0, 1, 2]]), tf.constant([[200.0, 200.0]]),
                                  num_samples=64, positive_fraction=0.5, seed=7)
    labels = labels.numpy()[0]
    iou = np_iou(anchors, gt)
    best = iou.max(1)
    best_for_gt = (iou == iou.max(0, keepdims=True)).any(1)
    positive = labels == 1
    assert (labels >= 0).sum() == 64 and 0 < positive.sum() <= 32
    assert np.all((best[positive] >= 0.7) | best_for_gt[positive])
    assert np.all(best[labels == 0] < 0.3)
    # Box targets of positives decode back onto their ground truth (weights 1, 1, 1, 1).
    t = targets.numpy()[0][positive]
    a = anchors[positive]
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    cx = a[:, 0] + 0.5 * aw + t[:, 0] * aw
    cy = a[:, 1] + 0.5 * ah + t[:, 1] * ah
    w, h = aw * np.exp(t[:, 2]), ah * np.exp(t[:, 3])
    decoded = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    np.testing.assert_allclose(decoded, gt[iou[positive].argmax(1)], atol=1e-3)


def test_generate_proposals_sorted_clipped_and_nms_applied():
    rng = np.random.default_rng(2)
    anchors = [tf.constant(random_boxes(rng, 50)), tf.constant(random_boxes(rng, 30))]
    logits = [tf.constant(rng.normal(size=(2, 50)), tf.float32),
              tf.constant(rng.normal(size=(2, 30)), tf.float32)]
    deltas = [tf.constant(rng.normal(0, 0.2, (2, 50, 4)), tf.float32),
              tf.constant(rng.normal(0, 0.2, (2, 30, 4)), tf.float32)]
    shapes = tf.constant([[120.0, 150.0], [200.0, 100.0]])
    boxes, scores, valid = generate_proposals(logits, deltas, anchors, shapes, pre_nms_top_k=20,
                                              post_nms_top_k=25, nms_iou=0.7)
    boxes, scores, valid = boxes.numpy(), scores.numpy(), valid.numpy()
    for b in range(2):
        n = valid[b].sum()
        assert 0 < n <= 25 and valid[b, :n].all()
        s = scores[b, :n]
        assert np.all(np.diff(s) <= 1e-6)
        h, w = shapes.numpy()[b]
        assert boxes[b, :n, [0, 2]].max() <= w + 1e-4 and boxes[b, :n, [1, 3]].max() <= h + 1e-4
        assert boxes[b, :n].min() >= 0
    # The same level never keeps two boxes overlapping more than the NMS threshold.
    assert n <= 40  # at most pre_nms_top_k per level survive


def test_rpn_head_output_layout():
    head = RPNHead(num_anchors=3, channels=8)
    feats = [tf.zeros([2, 6, 5, 4]), tf.zeros([2, 3, 3, 4])]
    logits, deltas = head(feats)
    assert [l.shape for l in logits] == [(2, 90), (2, 27)]
    assert [d.shape for d in deltas] == [(2, 90, 4), (2, 27, 4)]
    assert head.get_config()["num_anchors"] == 3


def test_decode_detections_recovers_a_known_box():
    rois = tf.constant([[[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 5.0, 5.0]]])
    # Class 2 of 2, deltas shift the box by (dx, dy) = (0.1, 0) of its size with weights 10,10,5,5.
    deltas = np.zeros([1, 2, 2, 4], np.float32)
    deltas[0, 0, 1] = [1.0, 0.0, 0.0, 0.0]  # dx * 10 -> 0.1 of the width: +4 px
    probs = tf.constant([[[0.1, 0.1, 0.8], [0.98, 0.01, 0.01]]])
    out = decode_detections(probs, tf.constant(deltas), rois, tf.ones([1, 2], bool),
                            tf.constant([[100.0, 100.0]]), score_threshold=0.05)
    n = int(out["num_detections"][0])
    assert n == 2  # 0.8 for class 1 (box 0), and 0.1 for class 0 (box 0)
    assert int(out["classes"][0, 0]) == 1
    np.testing.assert_allclose(out["boxes"][0, 0].numpy(), [14.0, 20.0, 54.0, 60.0], atol=1e-4)
    np.testing.assert_allclose(float(out["scores"][0, 0]), 0.8, atol=1e-6)


def test_roi_extractor_routes_each_roi_to_its_level():
    # Each level holds a constant equal to its level number: the pooled value tells the level.
    feats = [tf.fill([1, 64 // s, 64 // s, 2], float(level))
             for level, s in zip(range(2, 6), (4, 8, 16, 32))]
    rois = tf.constant([[[0, 0, 20, 20], [0, 0, 60, 60], [0, 0, 64, 64], [4, 4, 40, 40]]],
                       tf.float32)
    ext = RoIExtractor(output_size=2, strides=(4, 8, 16, 32), canonical_size=32.0)
    pooled = ext(feats, rois).numpy()
    sizes = np.array([20, 60, 64, 36], np.float32)
    expected = np.clip(np.floor(4 + np.log2(sizes / 32.0)), 2, 5)
    np.testing.assert_allclose(pooled[0, :, 0, 0, 0], expected)
    assert math.isclose(RoIExtractor.from_config(ext.get_config()).canonical_size, 32.0)


def test_roi_extractor_rejects_a_wrong_number_of_maps():
    ext = RoIExtractor(output_size=2, strides=(4, 8))
    with pytest.raises(ValueError, match="3 feature maps for strides"):
        ext([tf.zeros([1, 8, 8, 2])] * 3, tf.zeros([1, 1, 4]))


def test_box_head_losses_against_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(1, 4, 3)).astype(np.float32)  # K = 2
    deltas = rng.normal(size=(1, 4, 2, 4)).astype(np.float32)
    rois = np.array([[[0, 0, 10, 10], [5, 5, 25, 30], [0, 0, 4, 4], [1, 1, 2, 2]]], np.float32)
    gts = np.array([[[1, 1, 11, 12], [6, 4, 24, 33], [0, 0, 1, 1], [0, 0, 1, 1]]], np.float32)
    labels = np.array([[2, 1, 0, -1]], np.int32)
    cls, box = box_head_losses(tf.constant(logits), tf.constant(deltas),
                               {"labels": tf.constant(labels), "rois": tf.constant(rois),
                                "matched_boxes": tf.constant(gts)}, weights=(10, 10, 5, 5))
    # numpy: softmax CE over the 3 sampled RoIs; smooth L1 on the 2 foreground ones, / 3.
    z = logits[0, :3] - logits[0, :3].max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    ce = -logp[np.arange(3), labels[0, :3]].mean()
    total = 0.0
    for r in range(2):
        a, g = rois[0, r], gts[0, r]
        aw, ah, gw, gh = a[2] - a[0], a[3] - a[1], g[2] - g[0], g[3] - g[1]
        t = np.array([10 * ((g[0] + gw / 2) - (a[0] + aw / 2)) / aw,
                      10 * ((g[1] + gh / 2) - (a[1] + ah / 2)) / ah,
                      5 * np.log(gw / aw), 5 * np.log(gh / ah)])
        d = np.abs(deltas[0, r, labels[0, r] - 1] - t)
        total += np.where(d < 1, 0.5 * d ** 2, d - 0.5).sum()
    np.testing.assert_allclose(float(cls), ce, rtol=1e-5)
    np.testing.assert_allclose(float(box), total / 3, rtol=1e-5)
