"""Online hard example mining (OHEM) as an option of the RoI stage (`roi_ohem`): the per-RoI
losses, the selection of the hardest RoIs (by loss alone, R-FCN's reference code, or after NMS on
the RoIs scored by their loss, the OHEM paper's), and detectors training with it."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.heads.box_stage import per_roi_losses, select_hard_examples
from kerasdet.heads.roi_sampler import label_rois
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.rfcn import RFCN
from learning import tiny_fpn_settings
from test_rfcn import tiny_rfcn_settings


def _boxes(count, rng):
    """`count` distinct boxes (so a box names its row)."""
    xy = rng.uniform(0, 80, size=(count, 2))
    wh = rng.uniform(8, 40, size=(count, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _targets(rois, labels):
    rois = np.asarray(rois, np.float32)
    labels = np.asarray(labels, np.int32)
    return {"rois": tf.constant(rois), "labels": tf.constant(labels),
            "matched_boxes": tf.constant(rois + 1.0),
            "matched_index": tf.zeros(labels.shape, tf.int32),
            "iou": tf.zeros(labels.shape, tf.float32)}


def _reference_top(losses, labels, count):
    """numpy: the usable (label >= 0) rows by descending loss, at most `count`."""
    usable = np.flatnonzero(labels >= 0)
    order = usable[np.argsort(-losses[usable], kind="stable")]
    return order[:count]


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference_nms_top(losses, labels, rois, count, threshold):
    """numpy greedy NMS on the usable rows by descending loss: a row overlapping an already kept
    one by IoU > threshold is skipped; at most `count` kept."""
    kept = []
    for i in _reference_top(losses, labels, len(labels)):
        if all(_iou(rois[i], rois[j]) <= threshold for j in kept):
            kept.append(i)
        if len(kept) == count:
            break
    return np.array(kept, np.int64)


def _selected_rows(selected, rois):
    """Row indices of the selected RoIs (label >= 0) in `rois`, in slot order."""
    rows = []
    for box, label in zip(np.asarray(selected["rois"]), np.asarray(selected["labels"])):
        if label < 0:
            continue
        rows.append(int(np.flatnonzero(np.all(rois == box, axis=1))[0]))
    return np.array(rows, np.int64)


def test_selection_by_loss_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    rois = np.stack([_boxes(12, rng), _boxes(12, rng)])
    losses = np.stack([rng.permutation(12), rng.permutation(12)]).astype(np.float32) * 0.37
    labels = np.array([[1, 0, 0, -1, 2, 0, 0, 0, -1, 0, 3, 0],
                       [-1, -1, 0, -1, -1, 1, -1, -1, 0, -1, -1, 0]], np.int32)
    # count 5: image 0 has 10 usable rows (5 selected), image 1 only 4 (all taken, 1 slot empty).
    out = select_hard_examples(tf.constant(losses), _targets(rois, labels), count=5)
    assert out["labels"].shape == (2, 5) and out["rois"].shape == (2, 5, 4)
    for b in range(2):
        want = _reference_top(losses[b], labels[b], 5)
        np.testing.assert_array_equal(_selected_rows({k: v[b] for k, v in out.items()}, rois[b]),
                                      want)
        np.testing.assert_array_equal(np.asarray(out["labels"][b])[:len(want)], labels[b][want])
        np.testing.assert_array_equal(np.asarray(out["matched_boxes"][b])[:len(want)],
                                      rois[b][want] + 1.0)
    assert np.sum(np.asarray(out["labels"]) >= 0, axis=1).tolist() == [5, 4]
    # The hardest rows are not simply the first ones: the selection reorders.
    assert _reference_top(losses[0], labels[0], 5).tolist() != [0, 1, 2, 4, 5]


def test_selection_after_nms_on_the_losses_matches_a_numpy_reference():
    rng = np.random.default_rng(1)
    base = _boxes(6, rng) * 3.0  # well apart on a 300-pixel canvas
    near = base + np.array([1.0, 1.0, 1.0, 1.0], np.float32)  # IoU with its base ~0.9 > 0.7
    far = base + np.array([12.0, 0.0, 12.0, 0.0], np.float32)  # a shifted copy, lower IoU
    rois = np.concatenate([base, near, far])[np.newaxis]
    losses = rng.permutation(18).astype(np.float32)[np.newaxis] + 0.5
    labels = np.zeros([1, 18], np.int32)
    labels[0, 3] = -1
    overlaps = [_iou(rois[0, i], rois[0, i + 6]) for i in range(6)]
    assert min(overlaps) > 0.8  # each near copy is suppressed by (or suppresses) its base
    for count in (4, 10):
        out = select_hard_examples(tf.constant(losses), _targets(rois, labels), count,
                                   nms_iou=0.7)
        want = _reference_nms_top(losses[0], labels[0], rois[0], count, 0.7)
        got = _selected_rows({k: v[0] for k, v in out.items()}, rois[0])
        np.testing.assert_array_equal(got, want)
        without_nms = _reference_top(losses[0], labels[0], count)
        assert len(want) < count or want.tolist() != without_nms.tolist()


def test_per_roi_losses_are_cross_entropy_plus_smooth_l1_of_the_foreground():
    rng = np.random.default_rng(2)
    rois = _boxes(5, rng)[np.newaxis]
    matched = rois + rng.uniform(-3, 3, size=rois.shape).astype(np.float32)
    labels = np.array([[2, 0, -1, 1, 0]], np.int32)
    logits = rng.normal(size=(1, 5, 3)).astype(np.float32)
    deltas = rng.normal(size=(1, 5, 2, 4)).astype(np.float32)
    targets = dict(_targets(rois, labels), matched_boxes=tf.constant(matched))
    got = per_roi_losses(tf.constant(logits), tf.constant(deltas), targets).numpy()[0]

    def encode(box, roi):
        w, h = roi[2] - roi[0], roi[3] - roi[1]
        gw, gh = box[2] - box[0], box[3] - box[1]
        dx = ((box[0] + box[2]) / 2 - (roi[0] + roi[2]) / 2) / w
        dy = ((box[1] + box[3]) / 2 - (roi[1] + roi[3]) / 2) / h
        return np.array([10 * dx, 10 * dy, 5 * np.log(gw / w), 5 * np.log(gh / h)])

    for r in range(5):
        label = labels[0, r]
        if label < 0:
            assert got[r] == 0.0
            continue
        z = logits[0, r] - logits[0, r].max()
        want = -(z[label] - np.log(np.exp(z).sum()))
        if label >= 1:
            x = deltas[0, r, label - 1] - encode(matched[0, r], rois[0, r])
            want += np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5).sum()
        np.testing.assert_allclose(got[r], want, rtol=1e-4, atol=1e-5)


def _batch():
    return {"images": tf.random.uniform([2, 64, 64, 3], 0, 255, seed=4),
            "bounding_boxes": {"boxes": tf.constant([[[8, 8, 40, 40], [30, 20, 60, 56]],
                                                     [[20, 10, 60, 50], [0, 0, 0, 0]]],
                                                    tf.float32),
                               "labels": tf.constant([[0, 1], [2, -1]], tf.int32)}}


@pytest.mark.parametrize("factory, nms_iou", [
    (lambda **kw: RFCN(3, **tiny_rfcn_settings(**kw)), None),
    (lambda **kw: FasterRCNN(3, **dict(tiny_fpn_settings(), **kw)), 0.7),
], ids=["rfcn", "faster_rcnn_fpn_nms"])
def test_a_detector_trains_with_ohem_on_the_hardest_rois(factory, nms_iou):
    count = 24
    model = factory(roi_ohem=True, roi_ohem_nms_iou=nms_iou, roi_batch_size=count,
                    rpn_post_nms_top_k_train=200)
    model.build()
    assert model.get_config()["roi_ohem"] is True
    assert model.get_config()["roi_ohem_nms_iou"] == nms_iou
    context = model.first_stage(_batch(), training=True)
    selected = model.sample_training_rois(context)
    assert selected["labels"].shape[1] == count
    # The reference: every proposal (and ground-truth box) labelled, the stage's loss on each.
    labelled = label_rois(context["proposals"], context["proposal_valid"], context["gt_boxes"],
                          context["gt_labels"], gt_crowd=context["gt_crowd"])
    assert labelled["labels"].shape[1] == 200 + context["gt_boxes"].shape[1]
    stage = model.box_stages[0]
    logits, deltas = stage(context["roi_features"], labelled["rois"])
    losses = per_roi_losses(logits, deltas, labelled, stage.box_weights).numpy()
    rois, labels = labelled["rois"].numpy(), labelled["labels"].numpy()
    for b in range(2):
        if nms_iou is None:
            want = _reference_top(losses[b], labels[b], count)
        else:
            want = _reference_nms_top(losses[b], labels[b], rois[b], count, nms_iou)
        got = np.asarray(selected["labels"][b])
        assert np.sum(got >= 0) == len(want) == min(count, len(want))
        assert len(want) == count  # 200 proposals leave more usable RoIs than the count
        picked = np.asarray(selected["rois"][b])[got >= 0]
        # The same RoIs (rows with identical boxes, e.g. a proposal equal to a ground-truth box,
        # carry the same loss, so compare boxes).
        np.testing.assert_allclose(np.sort(picked, axis=0), np.sort(rois[b][want], axis=0),
                                   atol=1e-4)
    model.compile(optimizer="sgd")
    logs = model.train_on_batch(_batch(), return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert logs["roi_cls"] > 0.0
