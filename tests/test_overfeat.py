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
    """Single-object set (one shape per image): ILSVRC-style top-1 of the classification protocol,
    the share of images whose first guess has the right class and a box at IoU >= 0.5, and the
    mean IoU of that box (kerasdet.evaluation.localization)."""
    from kerasdet.evaluation.localization import evaluate_localization

    keras.utils.set_random_seed(0)
    train = make_dataset(str(tmp_path / "train"), 160, seed=11, image_size=(128, 128), min_objects=1,
                         max_objects=1, object_size=(20, 48))
    val = make_dataset(str(tmp_path / "val"), 48, seed=12, image_size=(128, 128), min_objects=1,
                       max_objects=1, object_size=(20, 48), split="val")
    model = OverFeatDetector(3, **tiny_settings(flips=True))
    history, seconds = _fit(model, train, epochs=5)
    figures = evaluate_localization(model, build_dataset(val, 8, image_size=(128, 128)))
    print(f"OverFeat tiny single-object after 5 epochs ({seconds:.0f}s): {figures}")
    assert figures["images"] == 48
    # measured: top-1 0.94, localization top-1 0.875, mean IoU 0.675 (36 s)
    assert figures["top1"] >= 0.8 and figures["localization_top1"] >= 0.65 and figures["mean_iou"] >= 0.55


def test_table2_protocols_and_exact_input_sizes():
    sizes = [[56, 56], [64, 72], 0.8, 1.0, [80, 96], 1.2]
    model = OverFeatDetector(3, **tiny_settings(scales=sizes))
    assert model.protocol("coarse_1_scale") == {"scales": ((56, 56),), "fine_stride": False}
    assert model.protocol("fine_4_scales") == {"scales": ((56, 56), (64, 72), 1.0, 1.2), "fine_stride": True}
    assert model.protocol("fine_6_scales")["scales"] == model.scales
    with pytest.raises(ValueError, match="unknown protocol"):
        model.protocol("fine_5_scales")
    with pytest.raises(ValueError, match="six scales"):
        OverFeatDetector(3, **tiny_settings()).protocol("fine_6_scales")
    with pytest.raises(ValueError, match=r"\[height, width\]"):
        OverFeatDetector(3, **tiny_settings(scales=[[64, 64, 3]]))
    with pytest.raises(ValueError, match="> 0"):
        OverFeatDetector(3, **tiny_settings(scales=[0.0]))
    # an exact size resizes the (padded) input to that size, whatever the input's own size
    images = tf.random.uniform([1, 100, 60, 3], 0, 255, seed=2)
    scaled, shapes = model._scaled(images, tf.constant([[90.0, 60.0]]), (80, 96))
    assert scaled.shape == (1, 80, 96, 3)
    np.testing.assert_allclose(shapes.numpy(), [[72.0, 96.0]])
    # table 2's rows give different detections through the same weights; a coarse single scale
    # sees 9x fewer windows than the fine one
    shapes = tf.constant([[100.0, 60.0]])
    fine = model._scale_candidates(images, shapes, 1.0)[1]
    coarse = model._scale_candidates(images, shapes, 1.0, fine_stride=False)[1]
    assert fine.shape[1] == 9 * coarse.shape[1]
    out = model.detect(images, shapes, **model.protocol("coarse_1_scale"))
    assert out["boxes"].shape == (1, 100, 4)
    assert OverFeatDetector.from_config(model.get_config()).scales == model.scales


def test_export_and_keras_file_round_trip(tmp_path):
    """The greedy merge is a tf.while_loop: the portable SavedModel runs it and gives predict's
    detections (the TF OD API layout: normalized y1, x1, y2, x2 and 1-based classes)."""
    from kerasdet.export import export_saved_model

    keras.utils.set_random_seed(3)
    model = OverFeatDetector(3, **tiny_settings(score_threshold=0.0))
    model.build((1, 64, 64, 3))
    path = export_saved_model(model, str(tmp_path / "saved_model"), portable=True, image_size=(64, 64))
    images = np.random.default_rng(4).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    info = np.tile(np.array([[64, 64, 1, 1, 64, 64]], np.float32), (2, 1))
    expected = model.predict({"images": images.astype(np.float32), "image_info": info}, verbose=0)
    count = int(expected["num_detections"][0])
    assert count > 0 and served["num_detections"].numpy()[0] == count
    np.testing.assert_allclose(served["detection_scores"].numpy()[0, :count], expected["scores"][0, :count],
                               rtol=1e-4)
    np.testing.assert_allclose(served["detection_boxes"].numpy()[0, :count] * 64,
                               np.clip(expected["boxes"][0, :count][:, [1, 0, 3, 2]], 0, 64), atol=1e-2)
    np.testing.assert_array_equal(served["detection_classes"].numpy()[0, :count],
                                  expected["classes"][0, :count] + 1)
    model.save(str(tmp_path / "model.keras"))
    clone = keras.saving.load_model(str(tmp_path / "model.keras"))
    again = clone.predict({"images": images.astype(np.float32), "image_info": info}, verbose=0)
    np.testing.assert_allclose(again["scores"], expected["scores"], atol=1e-6)
