"""The evaluation callback and evaluate_model, on a fake detector that returns fixed detections."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.evaluation import (EvaluationCallback, batch_to_ground_truths, evaluate_model,
                                 metrics_to_logs, predictions_to_dicts)

CAT, DOG = [10, 10, 50, 50], [60, 60, 90, 90]
NAMES = ["cat", "dog"]
SIZE = 100


class FixedDetector(keras.Model):
    """Returns, for each image, the detections stored for the index written in its pixel (0, 0, 0)."""

    def __init__(self, boxes, scores, classes, num_detections, masks=None, **kwargs):
        super().__init__(**kwargs)
        self.table = {"boxes": tf.constant(boxes, tf.float32), "scores": tf.constant(scores, tf.float32),
                      "classes": tf.constant(classes, tf.int32),
                      "num_detections": tf.constant(num_detections, tf.int32)}
        if masks is not None:
            self.table["masks"] = tf.constant(masks, tf.float32)

    def call(self, images):
        index = tf.cast(images[:, 0, 0, 0], tf.int32)
        return {key: tf.gather(value, index) for key, value in self.table.items()}

    def train_step(self, data):
        return {"loss": tf.constant(0.0)}


def _images(n):
    images = np.zeros((n, SIZE, SIZE, 3), np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    return images


def _scenario():
    """Four images in batches of two; expected results worked out in test_evaluate_model_by_hand."""
    far = [0, 0, 5, 5]
    k = 3
    boxes = np.zeros((4, k, 4), np.float32)
    scores = np.zeros((4, k), np.float32)
    classes = np.full((4, k), -1, np.int32)
    # img0: cat found (.9); slot 1 lies beyond num_detections=1: a confident dog on the gt padding
    # row's box, which must be ignored.
    boxes[0, :2], scores[0, :2], classes[0, :2] = [CAT, DOG], [0.9, 0.99], [0, 1]
    # img1: dog found (.8), a cat FP far away (.7)
    boxes[1, :2], scores[1, :2], classes[1, :2] = [DOG, far], [0.8, 0.7], [1, 0]
    # img2: nothing; img3 (no objects): a dog FP (.6)
    boxes[3, 0], scores[3, 0], classes[3, 0] = CAT, 0.6, 1
    num = np.array([1, 2, 0, 1], np.int32)
    gt_boxes = np.zeros((4, 2, 4), np.float32)
    gt_labels = np.full((4, 2), -1, np.int32)
    gt_boxes[0] = [CAT, DOG]
    gt_labels[0] = [0, -1]  # the dog row is padding
    gt_boxes[1], gt_labels[1] = [CAT, DOG], [0, 1]
    gt_boxes[2, 0], gt_labels[2, 0] = DOG, 1
    dataset = tf.data.Dataset.from_tensor_slices({
        "images": _images(4),
        "bounding_boxes": {"boxes": gt_boxes, "labels": gt_labels},
    }).batch(2)
    return FixedDetector(boxes, scores, classes, num), dataset


def test_evaluate_model_by_hand():
    # cat: gts in img0, img1; detections .9 TP (img0), .7 FP (img1) -> recall .5 .5, precision 1 .5
    #   -> VOC AP = .5 * 1 = .5; COCO: exact boxes match at every IoU threshold, envelope 1 up to
    #   recall .5 -> 51 of 101 recall points -> 51/101.
    # dog: gts in img1, img2; detections .8 TP (img1), .6 FP (img3) -> the same: .5 and 51/101.
    # Had the padding (prediction slot beyond num_detections, gt row with label -1) been kept, img0
    # would add a .99 dog detection and a dog gt and change both APs.
    model, dataset = _scenario()
    results = evaluate_model(model, dataset, class_names=NAMES)
    assert results["num_images"] == 4
    assert results["voc"]["mAP"] == pytest.approx(0.5)
    assert results["voc"]["AP"] == pytest.approx({"cat": 0.5, "dog": 0.5})
    assert results["coco"]["bbox"]["AP"] == pytest.approx(51 / 101)
    assert "segm" not in results["coco"]
    logs = metrics_to_logs(results)
    assert logs["val_voc_map50"] == pytest.approx(0.5)
    assert logs["val_coco_ap"] == pytest.approx(51 / 101)
    assert set(logs) == {"val_voc_map50", "val_coco_ap", "val_coco_ap50", "val_coco_ap75",
                         "val_coco_aps", "val_coco_apm", "val_coco_apl"}
    # max_batches=1 sees only img0 and img1: cat .9 TP, .7 FP over 2 gts -> .5; dog .8 TP over 1 gt -> 1.
    first = evaluate_model(model, dataset, metrics="voc", max_batches=1)
    assert first["voc"]["mAP"] == pytest.approx(0.75) and "coco" not in first


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(dict(logs or {}))


def test_callback_logs_metrics_for_later_callbacks(capsys):
    model, dataset = _scenario()
    model.compile(optimizer="sgd")
    recorder = _Recorder()
    callback = EvaluationCallback(dataset, every_n_epochs=2, class_names=NAMES)
    history = model.fit(dataset, epochs=3, verbose=0, shuffle=False, callbacks=[callback, recorder])
    # Evaluated after epoch 2 only (every_n_epochs=2, 3 epochs).
    assert "val_voc_map50" not in recorder.seen[0] and "val_voc_map50" not in recorder.seen[2]
    assert recorder.seen[1]["val_voc_map50"] == pytest.approx(0.5)
    assert recorder.seen[1]["val_coco_ap"] == pytest.approx(51 / 101)
    assert history.history["val_voc_map50"] == pytest.approx([0.5])
    printed = capsys.readouterr().out
    assert "Epoch 2 evaluation on 4 images" in printed and "cat" in printed and "dog" in printed
    assert callback.last_results["voc"]["per_class"]["cat"]["num_gt"] == 2


def test_mask_metrics_when_both_sides_have_masks():
    # One image, one cat whose mask is a disc inside its box; the prediction carries the same mask
    # as probabilities -> mask AP 1; a box-only model gets no "segm" entry (tested above).
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 18 ** 2).astype(np.float32)
    model = FixedDetector([[CAT]], [[0.9]], [[0]], [1], masks=disc[None, None] * 0.8)
    dataset = tf.data.Dataset.from_tensor_slices({
        "images": _images(1),
        "bounding_boxes": {"boxes": np.array([[CAT]], np.float32), "labels": np.array([[0]], np.int32)},
        "masks": disc[None, None].astype(np.uint8),
    }).batch(1)
    results = evaluate_model(model, dataset)
    assert results["coco"]["segm"]["AP"] == pytest.approx(1.0)
    assert metrics_to_logs(results)["val_coco_mask_ap"] == pytest.approx(1.0)


def test_padding_is_dropped():
    outputs = {"boxes": np.ones((2, 3, 4)), "scores": np.ones((2, 3)),
               "classes": np.array([[0, 1, 2], [0, -1, 2]]), "num_detections": np.array([2, 3])}
    dets = predictions_to_dicts(outputs)
    assert [len(d["scores"]) for d in dets] == [2, 2]  # image 1: the -1 class row is dropped too
    assert dets[1]["classes"].tolist() == [0, 2]
    batch = {"images": np.zeros((1, 8, 9, 3)),
             "bounding_boxes": {"boxes": np.ones((1, 3, 4)), "labels": np.array([[4, -1, -1]])}}
    gts = batch_to_ground_truths(batch)
    assert gts[0]["classes"].tolist() == [4] and gts[0]["image_size"] == (8, 9)


def test_bad_predictions_and_batches_are_reported():
    with pytest.raises(KeyError, match="num_detections"):
        predictions_to_dicts({"boxes": np.ones((1, 1, 4)), "scores": np.ones((1, 1)),
                              "classes": np.ones((1, 1))})
    with pytest.raises(ValueError, match=r"predictions\['scores'\] must be \[1, 2\]"):
        predictions_to_dicts({"boxes": np.ones((1, 2, 4)), "scores": np.ones((1, 3)),
                              "classes": np.ones((1, 2)), "num_detections": [1]})
    with pytest.raises(ValueError, match="'images' and 'bounding_boxes'"):
        batch_to_ground_truths({"images": np.zeros((1, 4, 4, 3))})
    model, dataset = _scenario()
    with pytest.raises(ValueError, match="metrics entries"):
        evaluate_model(model, dataset, metrics=("map",))
    with pytest.raises(ValueError, match="every_n_epochs"):
        EvaluationCallback(dataset, every_n_epochs=0)


def test_per_box_mask_grids_are_pasted():
    # The model predicts a 4x4 all-ones grid for the cat box; pasted, it fills exactly the box,
    # which is the ground-truth mask -> mask AP 1.
    gt_mask = np.zeros((SIZE, SIZE), np.uint8)
    gt_mask[10:50, 10:50] = 1
    model = FixedDetector([[CAT]], [[0.9]], [[0]], [1], masks=np.ones((1, 1, 4, 4)))
    dataset = tf.data.Dataset.from_tensor_slices({
        "images": _images(1),
        "bounding_boxes": {"boxes": np.array([[CAT]], np.float32), "labels": np.array([[0]], np.int32)},
        "masks": gt_mask[None, None],
    }).batch(1)
    results = evaluate_model(model, dataset, metrics="coco")
    assert results["coco"]["segm"]["AP"] == pytest.approx(1.0)
