"""The SPP-net detector (issue 16): scale choice and corner-rule projection inside the model against
kerasdet.ops.spp, a window's features against a direct reference (resize, backbone, project, SPP),
fc-only fine-tuning, and a learning test on the synthetic set with selective-search proposals,
SVMs and box regression. Figures are printed (pytest -s) and asserted below the measured ones."""
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.pipeline import build_dataset
from kerasdet.evaluation import evaluate_model
from kerasdet.models.spp_classifier import SPPClassifier
from kerasdet.models.sppnet import SPPNet, feature_geometry
from kerasdet.ops import spp as spp_ops

# 96 px images with objects of 16-48 px: the scales bring a window to about 48 px (6 C3 cells)
TINY = dict(backbone="tiny", feature="C3", scales=(64, 96, 144, 192), target=48.0,
            levels=(4, 2, 1), fc_dims=(128, 128), roi_batch_size=32, seed=0)


@pytest.fixture
def spp_data(shapes_with_proposals):
    return shapes_with_proposals


def _pipeline(data, cache, training, max_proposals=300):
    return build_dataset(data, 4, training=training, image_size=(96, 96), seed=0, proposals=cache,
                         max_proposals=max_proposals)


def test_feature_geometry_matches_the_documented_offsets():
    from kerasdet.backbones import registry

    # kerasdet.ops.spp.project_to_features: ZF-5's conv5 pixel m is centred on input pixel 16 m + 20
    assert feature_geometry(registry.get("zf"), "conv5") == (16, 20.0)
    tiny = registry.get("tiny")
    assert [feature_geometry(tiny, f) for f in ("C2", "C3", "C4", "C5")] == [
        (4, 0.0), (8, 0.0), (16, 0.0), (32, 0.0)]
    model = SPPNet(20, fc_dims=(8, 8))
    assert (model.feature_stride, model.feature_offset) == (16, 20.5)
    assert model.scales == (480, 576, 688, 864, 1200) and model.levels == (6, 3, 2, 1)


def test_scale_choice_and_projection_agree_with_the_ops_on_hand_cases():
    model = SPPNet(3, fc_dims=(8, 8))  # ZF-5, the paper's scales
    shapes = tf.constant([[375.0, 500.0], [500.0, 333.0]])
    rois = tf.constant([[[10.0, 20.0, 110.0, 120.0], [0.0, 0.0, 499.0, 374.0], [50, 50, 80, 70]],
                        [[0.0, 0.0, 224.0, 224.0], [5.0, 5.0, 330.0, 495.0], [1, 1, 20, 400]]])
    choice = model.window_scales(rois, shapes).numpy()
    # by hand: a 100 x 100 window in a 375-short image is 224 x 224 at s = 840, nearest 864 (3);
    # the whole image is 375 x 500 -> (s / 375)^2 * 187500 closest to 50176 at s = 480 (0);
    # a 30 x 20 window wants s ~ 2800 -> 1200 (4). Image 2 (short side 333): 224 x 224 wants
    # s = 333 -> 480 (0); 325 x 490 -> 480 (0); 19 x 399 (area 7581) wants s ~ 857 -> 864 (3).
    np.testing.assert_array_equal(choice, [[3, 0, 4], [0, 0, 3]])
    np.testing.assert_array_equal(
        choice, spp_ops.choose_scale(rois, model.scales, 224.0, image_size=shapes).numpy())
    sizes = model.resized_shapes(shapes).numpy()
    np.testing.assert_array_equal(sizes[0], [[480, 640], [721, 480]])  # 500 * 480 / 333 = 720.7
    cells = model.project(rois, shapes, sizes[3]).numpy()
    # scale 864 on image 1: factor 864 / 375 = 2.304 on both axes; box (10, 20, 110, 120) ->
    # (23.04, 46.08, 253.44, 276.48); corner rule with S = 16, O = 20.5 (continuous):
    # left floor((23.04 - 20.5) / 16) + 1 = 1, top floor(25.58 / 16) + 1 = 2,
    # right ceil(232.94 / 16) - 1 = 14, bottom ceil(255.98 / 16) - 1 = 15
    np.testing.assert_array_equal(cells[0, 0], [1, 2, 14, 15])
    factor = sizes[3][:, ::-1] / shapes.numpy()[:, ::-1]  # (fx, fy) per image
    direct = spp_ops.project_to_features(rois.numpy() * np.tile(factor[:, None], [1, 1, 2]), 16, 20.5)
    np.testing.assert_array_equal(cells, direct.numpy())


def test_window_features_equal_a_direct_reference():
    keras.utils.set_random_seed(3)
    model = SPPNet(3, **dict(TINY, scales=(80, 120, 200)))
    model.build()
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (2, 96, 96, 3)), tf.float32)
    # image 2 has a smaller valid region (90 x 60) inside the padded canvas
    shapes = tf.constant([[96.0, 96.0], [90.0, 60.0]])
    rois = tf.constant([[[4.0, 6.0, 40.0, 50.0], [10.0, 10.0, 90.0, 80.0], [30, 30, 42, 38]],
                        [[2.0, 3.0, 30.0, 70.0], [0.0, 0.0, 59.0, 89.0], [0, 0, 0, 0]]])
    valid = tf.constant([[True, True, True], [True, True, False]])
    fc7, pooled, logits = model.region_features(images, rois, valid, shapes)
    choice = spp_ops.choose_scale(rois, model.scales, model.target, image_size=shapes).numpy()
    assert len(set(choice[valid.numpy()])) > 1, "the hand cases should span several scales"
    for b in range(2):
        h, w = (int(v) for v in shapes[b].numpy())
        for r in range(3):
            if not valid[b, r]:
                assert not pooled[b, r].numpy().any()
                continue
            s = model.scales[choice[b, r]]
            nh, nw = round(h * s / min(h, w)), round(w * s / min(h, w))
            resized = tf.image.resize(images[b:b + 1, :h, :w], (nh, nw))
            # batched images share a canvas per scale (the largest resized image), padded with the
            # backbone's fill colour (black for tiny): conv features near a padded border see it
            canvas = [max(round(hh * s / min(hh, ww)) for hh, ww in ((96, 96), (90, 60))),
                      max(round(ww * s / min(hh, ww)) for hh, ww in ((96, 96), (90, 60)))]
            resized = tf.pad(resized, [[0, 0], [0, canvas[0] - nh], [0, canvas[1] - nw], [0, 0]])
            maps = model.backbone(resized)["C3"]
            box = rois[b, r].numpy() * np.array([nw / w, nh / h, nw / w, nh / h])
            x1, y1, x2, y2 = spp_ops.project_to_features(box, 8, 0.5).numpy()
            x2, y2 = min(x2, maps.shape[2] - 1), min(y2, maps.shape[1] - 1)
            expected = spp_ops.spatial_pyramid_pool(maps[:, y1:y2 + 1, x1:x2 + 1], model.levels)[0]
            np.testing.assert_allclose(pooled[b, r].numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
            ref_fc7, ref_logits = model.head(expected[None])
            np.testing.assert_allclose(fc7[b, r].numpy(), ref_fc7[0].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(logits[b, r].numpy(), ref_logits[0].numpy(), rtol=1e-4, atol=1e-4)


def test_vectorized_roi_spp_forward_equals_the_per_roi_loop(monkeypatch):
    # the SPP-net detector's speed rests on the sparse-table forward of kerasdet.ops.spp
    rng = np.random.default_rng(0)
    features = tf.constant(rng.normal(size=(2, 23, 41, 8)), tf.float32)
    n = 120
    x1, y1 = rng.integers(-2, 41, n), rng.integers(0, 23, n)
    rois = np.stack([x1, y1, x1 + rng.integers(0, 45, n), y1 + rng.integers(-1, 25, n)], 1)
    index = rng.integers(0, 2, n)
    fast = spp_ops.roi_spatial_pyramid_pool(features, rois, index)
    monkeypatch.setattr(spp_ops, "TABLE_ELEMENT_BUDGET", 0)
    loop = spp_ops.roi_spatial_pyramid_pool(features, rois, index)
    np.testing.assert_array_equal(fast.numpy(), loop.numpy())


def test_single_scale_mode_and_fc_only_fine_tuning_keeps_the_conv_layers(spp_data):
    train, _, caches = spp_data
    model = SPPNet(3, **dict(TINY, scales=(96,)))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.build()
    assert not model.backbone.trainable and model.backbone.trainable_weights == []
    conv = [w.numpy() for w in model.backbone.weights]
    fc = [w.numpy() for w in model.hidden[0][0].weights]
    model.fit(_pipeline(train, caches["train"], True).take(2), epochs=1, verbose=0)
    for before, after in zip(conv, model.backbone.weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert any(not np.array_equal(b, a.numpy()) for b, a in zip(fc, model.hidden[0][0].weights))


def test_sppnet_learns_with_selective_search_svms_and_box_regression(spp_data):
    train, val, caches = spp_data
    keras.utils.set_random_seed(0)
    # random conv layers: frozen they would not learn; the synthetic entry fine-tunes them too
    model = SPPNet(3, **TINY, train_conv=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=10.0))
    start = time.perf_counter()
    history = model.fit(_pipeline(train, caches["train"], True), epochs=8, verbose=0).history
    fine_tune = time.perf_counter() - start
    val_ds = _pipeline(val, caches["val"], False)
    softmax_map = evaluate_model(model, val_ds, metrics=("voc",))["voc"]["mAP"]
    start = time.perf_counter()
    summary = model.fit_region_stages(_pipeline(train, caches["train"], False), say=lambda *_: None)
    stages = time.perf_counter() - start
    svm_map = evaluate_model(model, val_ds, metrics=("voc",))["voc"]["mAP"]
    print(f"SPP-net tiny: fine-tuning 8 epochs {fine_tune:.0f}s (loss {history['cls'][0]:.3f} -> "
          f"{history['cls'][-1]:.3f}), softmax VOC mAP@0.5 {softmax_map:.3f}; SVMs + box regression "
          f"{stages:.0f}s -> {svm_map:.3f}; {summary}")
    assert history["cls"][-1] < 0.6 * history["cls"][0]
    assert all(p > 0 for p in summary["positives"]) and all(p > 0 for p in summary["regression_pairs"])
    assert float(model.svms_trained.numpy()) == 1.0
    # measured (two runs): softmax 0.902 / 0.899, SVMs + box regression 0.895 / 0.899
    # (fine-tuning 22-27 s, stages 10-12 s)
    assert softmax_map >= 0.75 and svm_map >= 0.75


def test_weights_round_trip_and_from_classifier(spp_data, tmp_path):
    train, val, caches = spp_data
    model = SPPNet(3, **TINY, svm={"rounds": 1})
    model.build()
    model.fit_region_stages(_pipeline(train, caches["train"], False).take(2), say=lambda *_: None)
    path = str(tmp_path / "sppnet.weights.h5")
    model.save_weights(path)
    clone = SPPNet.from_config(model.get_config())
    clone.build()
    clone.load_weights(path)
    for mine, theirs in zip(model.weights, clone.weights):
        assert mine.path == theirs.path
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    batch = next(iter(_pipeline(val, caches["val"], False)))
    inputs = {k: batch[k] for k in model.predict_input_keys}
    a, b = model.predict_on_batch(inputs), clone.predict_on_batch(inputs)
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)
    assert clone.get_config() == model.get_config()

    classifier = SPPClassifier(10, backbone="tiny", feature="C3", levels=(4, 2, 1), fc_dims=(128, 128))
    classifier(tf.zeros([1, 64, 64, 3]))
    detector = SPPNet.from_classifier(classifier, 3, scales=(96,), target=48.0)
    for mine, theirs in zip(detector.backbone.weights, classifier.backbone.weights):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    np.testing.assert_array_equal(detector.hidden[1][0].kernel.numpy(),
                                  classifier.hidden[1][0].kernel.numpy())
    assert detector.classifier.kernel.shape == (128, 4)
    with pytest.raises(ValueError, match="levels"):
        SPPNet.from_classifier(classifier, 3, levels=(2, 1))


def test_detections_are_padded_and_bad_settings_or_inputs_are_refused(spp_data):
    _, val, caches = spp_data
    model = SPPNet(3, **TINY, max_detections=20)
    batch = next(iter(_pipeline(val, caches["val"], False, max_proposals=50)))
    out = model.predict_on_batch({k: batch[k] for k in model.predict_input_keys})
    assert out["boxes"].shape == (4, 20, 4) and out["classes"].dtype == np.int32
    valid = out["classes"] >= 0
    assert (out["num_detections"] == valid.sum(1)).all()
    assert (out["boxes"][valid][:, 2:] >= out["boxes"][valid][:, :2]).all()
    with pytest.raises(ValueError, match="proposals"):
        model({"images": batch["images"], "image_info": batch["image_info"]})
    with pytest.raises(ValueError, match="backbone"):
        SPPNet(3, backbone="resnet50")
    with pytest.raises(ValueError, match="scales"):
        SPPNet(3, **dict(TINY, scales=()))
    with pytest.raises(ValueError, match="feature"):
        SPPNet(3, **dict(TINY, feature="conv5"))
    with pytest.raises(ValueError, match="background_iou_low"):
        SPPNet(3, **TINY, background_iou_low=0.6)
    with pytest.raises(TypeError):
        SPPNet(3, **TINY, svm={"not_a_setting": 1})
