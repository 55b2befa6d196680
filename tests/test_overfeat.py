"""OverFeat detector (issue #15): dense fine-stride evaluation as a kerasdet Detector, the
classification protocol, localization on single-object images and detection on the multi-object
synthetic set. Figures are printed (pytest -s) and asserted with a margin below the measured ones."""
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.pipeline import build_dataset
from kerasdet.data.synthetic import make_dataset
from kerasdet.evaluation import evaluate_model
from kerasdet.models.overfeat import OverFeatDetector
from kerasdet.ops.boxes import box_iou


def tiny_settings(**overrides):
    settings = dict(variant="tiny", classifier_dims=(128, 128), regressor_dims=(128, 64),
                    scales=(0.6, 1.0), train_scales=(0.6, 1.0), positive_iou=0.15, dropout=0.0, seed=0)
    settings.update(overrides)
    return settings


def test_fine_and_coarse_stride_maps_and_windows():
    model = OverFeatDetector(3, **tiny_settings())
    x = tf.random.uniform([1, 96, 120, 3], 0, 255, seed=0)
    fine_logits, fine_deltas, fine_windows = model.dense(x)
    coarse_logits, _, coarse_windows = model.dense(x, fine_stride=False)
    # features 24x30 -> 7x9 pooled per offset -> 4x6 classifier -> 12x18 interleaved (stride 4)
    assert fine_logits.shape == (1, 12, 18, 4) and fine_deltas.shape == (1, 12, 18, 4)
    assert coarse_logits.shape == (1, 4, 6, 4)
    # offset (0, 0) is the network's own pooling: the coarse map is every third fine output
    np.testing.assert_allclose(fine_logits.numpy()[:, ::3, ::3], coarse_logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fine_windows.numpy()[1, 2], [8, 4, 56, 52])
    np.testing.assert_array_equal(coarse_windows.numpy()[1, 2], [24, 12, 72, 60])


def test_class_specific_regressor_and_config_round_trip():
    model = OverFeatDetector(3, **tiny_settings(class_specific_regressor=True, negatives="hard"))
    x = tf.random.uniform([2, 80, 80, 3], 0, 255, seed=1)
    out = model(x)
    assert out["boxes"].shape == (2, 100, 4) and out["classes"].dtype == tf.int32
    assert model.dense(x)[1].shape[-1] == 12
    clone = OverFeatDetector.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert model.classify(x, flips=True).shape == (2, 3)


def _fit(model, train, epochs, batch_size=8):
    model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=10.0))
    data = build_dataset(train, batch_size, training=True, image_size=(128, 128), seed=0)
    start = time.perf_counter()
    history = model.fit(data, epochs=epochs, verbose=0)
    return history.history, time.perf_counter() - start


def test_overfeat_detects_the_synthetic_shapes(synthetic_data):
    keras.utils.set_random_seed(0)
    train, val = synthetic_data
    model = OverFeatDetector(3, **tiny_settings())
    history, seconds = _fit(model, train, epochs=5)
    voc_map = evaluate_model(model, build_dataset(val, 8, image_size=(128, 128)),
                             metrics=("voc",))["voc"]["mAP"]
    print(f"OverFeat tiny detection: held-out VOC mAP@0.5 {voc_map:.3f} after 5 epochs, {seconds:.0f}s, "
          f"loss {history['loss'][0]:.3f} -> {history['loss'][-1]:.3f}")
    assert history["cls"][-1] < 0.5 * history["cls"][0]
    assert history["box"][-1] < 0.7 * history["box"][0]
    assert voc_map >= 0.35


def test_overfeat_classifies_and_localizes_single_objects(tmp_path):
    """Single-object set: one shape per image (images drawn without an object are left out of the
    measurement); top-1 of the classification protocol and the IoU of the best merged box of the
    predicted class with the object."""
    keras.utils.set_random_seed(0)
    train = make_dataset(str(tmp_path / "train"), 160, seed=11, image_size=(128, 128), max_objects=1,
                         object_size=(20, 48))
    val = make_dataset(str(tmp_path / "val"), 48, seed=12, image_size=(128, 128), max_objects=1,
                       object_size=(20, 48), split="val")
    model = OverFeatDetector(3, **tiny_settings(flips=True))
    history, seconds = _fit(model, train, epochs=5)
    correct, ious = [], []
    for batch in build_dataset(val, 8, image_size=(128, 128)):
        labels = batch["bounding_boxes"]["labels"].numpy()
        scores = model.classify(batch["images"]).numpy()
        detections = model.predict_on_batch(batch)
        for b in range(len(labels)):
            if (labels[b] >= 0).sum() != 1:
                continue
            predicted = int(scores[b].argmax())
            correct.append(predicted == labels[b, 0])
            classes = detections["classes"][b]
            hits = np.flatnonzero(classes == predicted)
            box = detections["boxes"][b][hits[0] if len(hits) else 0]
            ious.append(float(box_iou(box[None], batch["bounding_boxes"]["boxes"][b, :1]).numpy()[0, 0]))
    top1, mean_iou = float(np.mean(correct)), float(np.mean(ious))
    print(f"OverFeat tiny single-object: top-1 {top1:.3f}, mean IoU {mean_iou:.3f} over {len(correct)} "
          f"images after 5 epochs ({seconds:.0f}s)")
    assert len(correct) >= 15
    assert top1 >= 0.6 and mean_iou >= 0.4
