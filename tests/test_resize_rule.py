"""One resize rule for the pipeline, predict, export and evaluation; padding the backbone's way;
input settings and class names carried in the model's config."""
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.resize import ResizeRule, boxes_to_original
from kerasdet.models.faster_rcnn import FasterRCNN


def _numpy_size(height, width, short, longest, rounding):
    """Faster R-CNN's rule written from its definition (scale the shorter side to `short` unless the
    longer side would pass `longest`), rounded as asked, in float64."""
    scale = min(short / min(height, width), longest / max(height, width))
    op = math.floor if rounding == "floor" else round
    return max(op(height * scale), 1), max(op(width * scale), 1)


@pytest.mark.parametrize("rounding", ["round", "floor"])
def test_target_size_matches_the_definition(rounding):
    rule = ResizeRule(min_size=800, max_size=1333, size_rounding=rounding)
    for height, width in [(300, 451), (480, 640), (375, 500), (1, 1000), (333, 333), (1200, 97)]:
        got = [int(v) for v in rule.target_size(float(height), float(width))]
        assert got == list(_numpy_size(height, width, 800, 1333, rounding)), (height, width)
    # The case where the two roundings differ (451 * 800 / 300 = 1202.67).
    assert int(ResizeRule(min_size=800, max_size=1333).target_size(300.0, 451.0)[1]) == 1203
    assert int(ResizeRule(min_size=800, max_size=1333, size_rounding="floor").target_size(300.0, 451.0)[1]) == 1202


def test_multi_scale_training_and_the_test_size():
    rule = ResizeRule(min_size=(480, 560, 640), max_size=2000)
    seen = {int(rule.target_size(100.0, 200.0, training=True, seed=tf.constant([s, 7]))[0]) for s in range(40)}
    assert seen == {480, 560, 640}
    assert [int(v) for v in rule.target_size(100.0, 200.0)] == [640, 1280]   # test: the largest
    custom = ResizeRule(min_size=(480, 560, 640), max_size=2000, min_size_test=560)
    assert [int(v) for v in custom.target_size(100.0, 200.0)] == [560, 1120]
    with pytest.raises(ValueError, match="seed"):
        rule.target_size(100.0, 200.0, training=True)


def test_settings_round_trip_and_errors():
    for settings in ({"min_size": 800, "max_size": 1333, "stride": 32},
                     {"min_size": [640, 800], "max_size": 1333, "min_size_test": 800, "stride": 32},
                     {"image_size": [320, 320], "keep_aspect_ratio": False, "stride": 1},
                     {"min_size": 600, "max_size": 1000, "stride": 16, "size_rounding": "floor"}):
        assert ResizeRule.from_settings(settings).to_settings() == settings
    with pytest.raises(ValueError, match="exactly one resize mode"):
        ResizeRule.from_settings({"stride": 32})
    with pytest.raises(ValueError, match="unknown keys"):
        ResizeRule.from_settings({"min_size": 800, "max_sise": 1333})
    with pytest.raises(ValueError, match="min_size must be a positive integer"):
        ResizeRule.from_settings({"min_size": -3})
    with pytest.raises(ValueError, match="size_rounding"):
        ResizeRule.from_settings({"min_size": 8, "size_rounding": "ceil"})


def test_boxes_to_original_inverts_the_resize_and_clips():
    rule = ResizeRule(min_size=800, max_size=1333, stride=32)
    _, info = rule.resize(tf.zeros([300, 451, 3]))
    info = info.numpy()
    original = np.array([[10.0, 20.0, 200.0, 290.0], [0.0, 0.0, 451.0, 300.0]])
    scaled = original * np.array([info[3], info[2], info[3], info[2]])
    np.testing.assert_allclose(boxes_to_original(scaled, info), original, atol=1e-6)
    np.testing.assert_allclose(boxes_to_original(tf.constant(scaled, tf.float32), info).numpy(),
                               original, atol=1e-3)
    outside = boxes_to_original(np.array([[-5.0, -5.0, 5000.0, 5000.0]]), info)
    np.testing.assert_allclose(outside, [[0.0, 0.0, 451.0, 300.0]])


def _records(tmp_path, sizes):
    from kerasdet.data.synthetic import make_dataset

    del sizes
    return make_dataset(str(tmp_path / "syn"), 3, seed=5, image_size=(70, 95))


def test_pipeline_predict_and_export_resize_alike(tmp_path):
    """The pipeline (evaluation), predict_images and the SavedModel all see the image at the same
    size: with multi-scale settings the old predict took the first size and the old export the
    largest; both now use the test size."""
    from kerasdet.data.pipeline import build_dataset
    from kerasdet.export import _prepare_one, serving_input_settings

    dataset = _records(tmp_path, None)
    settings = {"min_size": [40, 64], "max_size": 200, "stride": 32}
    batch = next(iter(build_dataset(dataset, 1, input_settings=settings)))
    info = batch["image_info"][0].numpy()
    assert tuple(info[4:6]) == (64.0, 87.0) and batch["images"].shape[1:3] == (64, 96)

    model = FasterRCNN(3, backbone="tiny", fpn_channels=16, fc_dim=32, input_settings=settings,
                       anchor_sizes=((8,), (16,), (32,), (64,), (128,)))
    model.build((1, 64, 96, 3))
    rule = serving_input_settings(model)
    image = tf.zeros([70, 95, 3])
    _, exported_info = _prepare_one(image, rule, rule.max_canvas())
    canvas, predict_info = rule.prepare(image)
    np.testing.assert_array_equal(exported_info.numpy(), info)
    np.testing.assert_array_equal(predict_info.numpy(), info)
    assert canvas.shape == (64, 96, 3)


def _tiny_model(**kwargs):
    model = FasterRCNN(2, backbone="tiny", backbone_config={"input_normalization": "torchvision"},
                       fpn_channels=16, fc_dim=32, anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
                       rpn_post_nms_top_k_test=50, score_threshold=0.0, **kwargs)
    model.build((1, 64, 64, 3))
    return model


def test_padding_is_the_normalization_mean_so_padding_does_not_change_detections():
    """torchvision pads the normalized image with zeros: kerasdet fills its padding with the
    backbone's mean colour, so after normalization the padded area is exactly 0, whatever the
    pipeline padded with."""
    model = _tiny_model()
    mean = np.array(model.padding_value())
    np.testing.assert_allclose(mean, [0.485 * 255, 0.456 * 255, 0.406 * 255], rtol=1e-6)
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 50, 70, 3)).astype(np.float32)
    info = tf.constant([[50.0, 70.0, 1.0, 1.0, 50.0, 70.0]])
    black = np.zeros((1, 64, 96, 3), np.float32)
    black[:, :50, :70] = image
    filled = model.input_images({"images": tf.constant(black), "image_info": info}).numpy()
    np.testing.assert_array_equal(filled[:, :50, :70], image)
    np.testing.assert_array_equal(filled[0, 50:, :], np.broadcast_to(mean, (14, 96, 3)).astype(np.float32))
    normalized = model.backbone.get_layer("input_normalization")(tf.constant(filled)).numpy()
    assert np.abs(normalized[0, 50:]).max() < 1e-6 and np.abs(normalized[0, :, 70:]).max() < 1e-6

    white = black.copy()
    white[:, 50:], white[:, :, 70:] = 255.0, 255.0
    a = model.predict_on_batch({"images": black, "image_info": info})
    b = model.predict_on_batch({"images": white, "image_info": info})
    for key in ("boxes", "scores", "classes"):
        np.testing.assert_array_equal(a[key], b[key])
    # A model without a normalization layer (the tiny net rescales by 1/255) leaves images alone.
    plain = FasterRCNN(2, backbone="tiny", fpn_channels=16, fc_dim=32)
    plain.build((1, 64, 64, 3))
    assert plain.padding_value() is None
    np.testing.assert_array_equal(plain.input_images({"images": black, "image_info": info}), black)


def test_training_sees_the_filled_padding():
    """train_step fills the padding too (the same input as predict)."""
    model = _tiny_model()
    seen = {}
    original = model.compute_detection_losses

    def spy(batch, training):
        seen["images"] = batch["images"]
        return original(batch, training)

    model.compute_detection_losses = spy
    import keras

    model.compile(optimizer=keras.optimizers.SGD(0.0))
    images = np.zeros((1, 64, 64, 3), np.float32)
    batch = {"images": images, "image_info": np.array([[32, 40, 1, 1, 32, 40]], np.float32),
             "bounding_boxes": {"boxes": np.array([[[2.0, 2.0, 20.0, 20.0]]], np.float32),
                                "labels": np.array([[0]], np.int32)}}
    model.train_step(batch)
    assert float(seen["images"][0, 40, 50, 0]) == pytest.approx(0.485 * 255, rel=1e-6)
    assert float(seen["images"][0, 10, 10, 0]) == 0.0


def test_class_names_and_input_settings_survive_keras_save_and_export(tmp_path):
    import keras

    from kerasdet.export import export_saved_model
    from kerasdet.engine import predict_images
    from kerasdet.visualize import save_png

    settings = {"min_size": 48, "max_size": 80, "stride": 32}
    model = _tiny_model(class_names=("coin", "nucleus"), input_settings=settings)
    with pytest.raises(ValueError, match="num_classes=2"):
        model.class_names = ("coin",)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.class_names == ("coin", "nucleus")
    assert loaded.input_settings == settings
    photo = str(tmp_path / "photo.png")
    save_png(np.random.default_rng(1).integers(0, 255, (45, 70, 3)).astype(np.uint8), photo)
    ours = predict_images(loaded, [photo], str(tmp_path / "pred"), score_threshold=0.0)
    reference = predict_images(model, [photo], str(tmp_path / "pred0"), score_threshold=0.0)
    assert ours[0]["detections"] == reference[0]["detections"]
    assert {d["class_name"] for d in ours[0]["detections"]} <= {"coin", "nucleus"}
    export_saved_model(loaded, str(tmp_path / "export"))   # no image_size needed
    with open(os.path.join(tmp_path, "export", "assets", "class_names.json"), encoding="utf-8") as handle:
        assert json.load(handle) == ["coin", "nucleus"]
    with open(os.path.join(tmp_path, "export", "assets", "label_map.pbtxt"), encoding="utf-8") as handle:
        assert handle.read() == 'item {\n  id: 1\n  name: "coin"\n}\nitem {\n  id: 2\n  name: "nucleus"\n}\n'
    with open(os.path.join(tmp_path, "pred", "detections.json"), encoding="utf-8") as handle:
        assert json.load(handle)[0]["detections"] == ours[0]["detections"]
