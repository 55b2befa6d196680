"""ILSVRC-style localization metrics (kerasdet.evaluation.localization) on hand-made detections whose
figures are worked out by hand below."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.evaluation.localization import evaluate_localization


class FixedDetections:
    """A detector stand-in: returns the given detections for the one batch it sees."""
    predict_input_keys = ("images", "image_info")

    def __init__(self, num_classes, outputs, class_scores=None):
        self.num_classes, self.outputs, self.class_scores = num_classes, outputs, class_scores
        if class_scores is not None:
            self.classify = self._classify

    def predict_on_batch(self, inputs):
        return self.outputs

    def _classify(self, images, **protocol):
        # each image's pixels hold its index in the batch (see _batch)
        index = tf.cast(images[:, 0, 0, 0], tf.int32)
        return tf.gather(tf.constant(self.class_scores, tf.float32), index)


def _batch(gt_boxes, gt_labels):
    n = len(gt_boxes)
    return {"images": tf.broadcast_to(tf.range(n, dtype=tf.float32)[:, None, None, None], [n, 8, 8, 3]),
            "image_info": tf.constant([[8, 8, 1, 1, 8, 8]] * n, tf.float32),
            "bounding_boxes": {"boxes": tf.constant(gt_boxes, tf.float32),
                               "labels": tf.constant(gt_labels, tf.int32)}}


GT_BOXES = [[[0, 0, 10, 10], [0, 0, 0, 0]],
            [[0, 0, 10, 10], [0, 0, 0, 0]],
            [[20, 20, 40, 40], [0, 0, 0, 0]],
            [[0, 0, 10, 10], [5, 5, 9, 9]]]          # two objects: skipped
GT_LABELS = [[1, -1], [2, -1], [0, -1], [0, 1]]
OUTPUTS = {
    # image 0: class 1 at IoU 1 (score .9) and class 0 elsewhere (score .5)
    # image 1: class 0 best (score .8, IoU 1), class 2 at IoU 25/100 = .25 (score .6)
    # image 2: class 0 twice: the higher-scoring box (IoU 100/400 = .25) is its box, not the exact one
    "boxes": np.array([[[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 0, 0]],
                       [[0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 0, 0]],
                       [[20, 20, 30, 30], [20, 20, 40, 40], [0, 0, 0, 0]],
                       [[0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32),
    "scores": np.array([[.9, .5, 0], [.8, .6, 0], [.7, .4, 0], [.9, 0, 0]], np.float32),
    "classes": np.array([[1, 0, -1], [0, 2, -1], [0, 0, -1], [0, -1, -1]], np.int32),
}


def test_ranking_by_detections_matches_the_hand_worked_figures():
    out = evaluate_localization(FixedDetections(3, OUTPUTS), [_batch(GT_BOXES, GT_LABELS)], top_k=2)
    # image 0: first guess class 1, IoU 1 -> right. image 1: first guess class 0 (wrong), second
    # class 2 but IoU .25 -> no localization. image 2: class 0 right, its box IoU .25 -> wrong box.
    assert out["images"] == 3 and out["skipped"] == 1
    assert out["top1"] == pytest.approx(2 / 3) and out["top2"] == pytest.approx(1.0)
    assert out["localization_top1"] == pytest.approx(1 / 3)
    assert out["localization_top2"] == pytest.approx(1 / 3)
    # mean IoU scores the first guess's box whatever its class: image 1's class-0 box is exact
    assert out["mean_iou"] == pytest.approx((1.0 + 1.0 + 0.25) / 3)


def test_a_classify_method_ranks_the_classes():
    # image 1's classifier puts class 2 first: its box (IoU .25) makes the class right, the box not.
    scores = [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.0, 0.0, 1.0]]
    model = FixedDetections(3, OUTPUTS, class_scores=scores)
    out = evaluate_localization(model, [_batch(GT_BOXES, GT_LABELS)], top_k=5)
    assert out["top1"] == pytest.approx(1.0) and out["top5"] == pytest.approx(1.0)
    assert out["localization_top1"] == pytest.approx(1 / 3)
    assert out["mean_iou"] == pytest.approx((1.0 + 0.25 + 0.25) / 3)


def test_a_class_without_a_box_counts_as_a_miss_and_empty_sets_are_refused():
    outputs = {k: v[:1] for k, v in OUTPUTS.items()}
    outputs = dict(outputs, classes=np.array([[-1, -1, -1]], np.int32))
    out = evaluate_localization(FixedDetections(3, outputs), [_batch(GT_BOXES[:1], GT_LABELS[:1])])
    assert out["localization_top1"] == 0.0 and out["mean_iou"] == 0.0
    with pytest.raises(ValueError, match="exactly one object"):
        evaluate_localization(FixedDetections(3, OUTPUTS), [_batch(GT_BOXES[3:], GT_LABELS[3:])])
